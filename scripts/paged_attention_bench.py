"""Attention over 30 layers of the default target's shapes: slot views against paged blocks.

    PYTHONPATH=$PWD python scripts/paged_attention_bench.py [--threads 1] [--repeats 20]

H = 9, H_kv = 3, D = 64, block size 16; each layer has its own K, V memory, so nothing stays in the
caches from one layer to the next. For each (B sequences, L keys already cached, n new rows each):
  (a) slots:   SDPA over contiguous per-slot views [B, H_kv, L + n, D] of a slot buffer [S, H_kv, C, D]
               (the lean forward's layout and its attention, adasd_core.lean._attention)
  (b) gather:  the same SDPA after gathering each sequence's blocks from a paged pool [H_kv, NB, bs, D]
  (c) kernel:  adasd_core.paged_attention over the pool, in place
  (d) torch:   paged_attention_torch, the fallback (gather, zero past the ends, masked SDPA)
Variants run interleaved (their order rotated each repeat); the median of the repeats, in ms per
30 layers, and each one's ratio to (a).

Measured (2 cores of a Xeon with AVX-512, 2 threads; kernel / slots): 0.86 at (1, 300, 1), 0.89 at
(1, 300, 6), 0.70 at (4, 200, 6), 0.62 at (16, 200, 1), 0.79 at (16, 200, 6), 0.73 at (16, 512, 1),
0.90 at (16, 512, 6); gather + SDPA 1.4 to 2.4.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adasd_core import lean, paged_attention
from adasd_core.device import fold_query_groups

LAYERS, H, HKV, D, BS = 30, 9, 3, 64, 16
CONFIGS = [(1, 300, 1), (1, 300, 6), (4, 200, 6), (16, 200, 1), (16, 200, 6), (16, 512, 1), (16, 512, 6)]


def setup(B: int, L: int, n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    end, scale = L + n, D**-0.5
    capacity = end + 128
    m = -(-end // BS)
    groups = H // HKV if fold_query_groups(torch.device("cpu")) else 1
    mask, causal, groups = lean._masking([L] * B, [n] * B, end, groups, torch.device("cpu"))
    q = torch.randn(B, n, H, D, generator=g)
    layers = []
    for _ in range(LAYERS):
        kc = torch.randn(B, HKV, capacity, D, generator=g)  # the slot buffer [S, H_kv, C, D]
        vc = torch.randn(B, HKV, capacity, D, generator=g)
        nb = B * m + 8
        tables = torch.randperm(nb, generator=g)[: B * m].view(B, m).to(torch.int32)
        pool_k = torch.randn(HKV, nb, BS, D, generator=g)
        pool_v = torch.randn(HKV, nb, BS, D, generator=g)
        for b in range(B):  # the same keys in both layouts
            pos = torch.arange(end)
            blk = tables[b].long()[pos // BS]
            pool_k[:, blk, pos % BS] = kc[b, :, :end]
            pool_v[:, blk, pos % BS] = vc[b, :, :end]
        layers.append((kc, vc, pool_k, pool_v, tables))
    q_seq = torch.arange(B, dtype=torch.int32).repeat_interleave(n)
    q_pos = (L + torch.arange(n, dtype=torch.int32)).repeat(B)
    return dict(B=B, n=n, end=end, m=m, scale=scale, mask=mask, causal=causal, groups=groups, q=q,
                q_rows=q.reshape(B * n, H, D), q_seq=q_seq, q_pos=q_pos, layers=layers)


def slots(s: dict) -> torch.Tensor:
    B, end = s["B"], s["end"]
    for kc, vc, *_ in s["layers"]:
        out = lean._attention(s["q"], kc[:B, :, :end], vc[:B, :, :end], s["mask"], s["causal"], s["groups"],
                              s["scale"])
    return out.reshape(B * s["n"], H, D)


def gather(s: dict) -> torch.Tensor:
    B, end, m = s["B"], s["end"], s["m"]
    for _, _, pool_k, pool_v, tables in s["layers"]:
        idx = tables.long()
        keys = pool_k[:, idx].reshape(HKV, B, m * BS, D).transpose(0, 1)[:, :, :end]
        values = pool_v[:, idx].reshape(HKV, B, m * BS, D).transpose(0, 1)[:, :, :end]
        out = lean._attention(s["q"], keys, values, s["mask"], s["causal"], s["groups"], s["scale"])
    return out.reshape(B * s["n"], H, D)


def kernel(s: dict, fn=paged_attention.paged_attention) -> torch.Tensor:
    for _, _, pool_k, pool_v, tables in s["layers"]:
        out = fn(s["q_rows"], pool_k, pool_v, tables, s["q_seq"], s["q_pos"], s["scale"])
    return out


def fallback(s: dict) -> torch.Tensor:
    return kernel(s, paged_attention.paged_attention_torch)


VARIANTS = {"slots": slots, "gather": gather, "kernel": kernel, "torch": fallback}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert paged_attention.kernel_available(), "the CPU kernel did not build"
    print(f"threads {torch.get_num_threads()}, {LAYERS} layers, H {H}, H_kv {HKV}, D {D}, bs {BS}; "
          f"median of {args.repeats}, ms per {LAYERS} layers (ratio to slots)")
    names = list(VARIANTS)
    print(f"{'B':>3} {'L':>4} {'n':>2} " + " ".join(f"{k:>15}" for k in names) + "  max|kernel-slots|")
    for B, L, n in CONFIGS:
        s = setup(B, L, n)
        outs = {k: fn(s) for k, fn in VARIANTS.items()}  # warm up, and check they agree
        err = (outs["kernel"] - outs["slots"]).abs().max().item()
        times = {k: [] for k in names}
        for r in range(args.repeats):
            for k in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                VARIANTS[k](s)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = [f"{med[k]:7.2f} ({med[k] / med['slots']:4.2f})" for k in names]
        print(f"{B:>3} {L:>4} {n:>2} " + " ".join(cells) + f"  {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
