"""Where the default target's single-token lean decode step goes: torch.profiler by op, beside the step's
own median (the gap between the two is the Python that runs between ops, which the profiler does not count).

    python scripts/step_profile.py [--threads 2] [--compile]

It also times the step's matrix products alone (the same weights, the same one-row inputs, in the same
order), interleaved with whole steps: the step over its products is the per-op overhead's share.
--compile also times a torch.compile'd copy of the same step (inductor's CPU C++ backend, static shapes),
interleaved with the eager step. Run it alone on the cores (docs/performance/step-profile.md)."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from adasd_core import lean as L
from adasd_core.kv_cache import SlotPool, make_pool
from adasd_core.models import load_pair

TARGET = os.path.expanduser("~/.cache/adasd/smollm2-135m-instruct")


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def decode_core(lm: L.LeanModel, k_pool, v_pool):
    """The lean forward's one-sequence, one-token path, with plain F.linear (what inductor can trace)."""
    def lin(m, x):
        return F.linear(x, m.weight, m.bias) if m.int8 is None else m(x)

    def core(tok: torch.Tensor, pos: torch.Tensor, start: int, end: int) -> torch.Tensor:
        H, Hkv, D = lm.n_heads, lm.n_kv, lm.head_dim
        cos, sin = lm.cos[pos][:, None], lm.sin[pos][:, None]
        x = F.embedding(tok, lm.embed)
        nqk, half = H + Hkv, D // 2
        for i, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(lm.layers):
            fused = lin(qkv, lm.rms_norm(x, ln1))
            qk = fused[:, : nqk * D].view(1, nqk, D)
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            q, k = qk[:, :H], qk[:, H:]
            v = fused[:, nqk * D :].view(1, Hkv, D)
            k_pool[i][0, :, start:end] = k.transpose(0, 1)
            v_pool[i][0, :, start:end] = v.transpose(0, 1)
            keys, values = k_pool[i][0:1, :, :end], v_pool[i][0:1, :, :end]
            attn = F.scaled_dot_product_attention(q.reshape(1, 1, H, D).transpose(1, 2), keys, values,
                                                  scale=lm.scale, enable_gqa=Hkv != H).transpose(1, 2)
            x = x + lin(o_proj, attn.reshape(1, H * D))
            gate, up = lin(gate_up, lm.rms_norm(x, ln2)).chunk(2, dim=-1)
            x = x + lin(down, lm.act(gate) * up)
        return lin(lm.head, lm.rms_norm(x, lm.norm))

    return core


def products_only(lm: L.LeanModel):
    """The step's matrix products alone: every layer's q/k/v, o, gate/up and down, then the head, each on
    a one-row input of its width."""
    C, H, D = lm.embed.shape[1], lm.n_heads, lm.head_dim
    x, attn = torch.randn(1, C), torch.randn(1, H * D)
    inner = [torch.randn(1, down.weight.shape[1]) for *_, down in lm.layers]

    def run():
        for (_, qkv, o_proj, _, gate_up, down), h in zip(lm.layers, inner):
            qkv(x)
            o_proj(attn)
            gate_up(x)
            down(h)
        lm.head(x)

    return run


def interleaved(fns, rounds: int) -> list[float]:
    """Medians (ms) of each fn, run in turn (the order alternating), the first three rounds dropped."""
    times = [[] for _ in fns]
    for r in range(rounds + 3):
        order = list(range(len(fns))) if r % 2 == 0 else list(range(len(fns)))[::-1]
        for i in order:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t[3:]) * 1e3 for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--context", type=int, default=64, help="tokens already in the cache at each step")
    args = ap.parse_args()
    ctx = args.context
    torch.set_num_threads(args.threads)
    pair = load_pair(TARGET, None, device="cpu", max_model_len=512)
    pool = make_pool(pair.target, 1, ctx + 64)
    ids = [100 + i % 1000 for i in range(ctx)]
    pool.forward([0], [ids])

    def step():
        pool.forward([0], [ids[:1]])[-1].argmax().item()
        pool.rollback(0, ctx)

    for _ in range(5):
        step()
    print(f"threads {args.threads}, context {ctx}; eager step median {median_ms(step, args.rounds):.1f} ms")
    whole, products = interleaved([step, products_only(L.lean_model(pair.target))], args.rounds)
    print(f"interleaved: step {whole:.1f} ms, its matrix products alone {products:.1f} ms: "
          f"step / products {whole / products:.2f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            step()
    table = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in table)
    for e in sorted(table, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"{e.key[:48]:48s} {e.self_cpu_time_total / 10 / 1e3:7.2f} ms/step  calls/step {e.count / 10:6.0f}"
              f"  {100 * e.self_cpu_time_total / total:5.1f}%")
    print(f"ops' self time {total / 10 / 1e3:.1f} ms/step; ops/step {sum(e.count for e in table) / 10:.0f}")
    if not args.compile:
        return
    lm = L.lean_model(pair.target)
    lm.rotary(torch.arange(ctx + 64), ctx + 64)
    slots = SlotPool(lm, 1, ctx + 64)  # the compiled core writes one contiguous slot
    slots.forward([0], [ids])
    compiled = torch.compile(decode_core(lm, slots.k, slots.v))
    tok, pos = torch.tensor([ids[0]]), torch.tensor([ctx])
    t0 = time.perf_counter()
    eager_logits = pool.forward([0], [ids[:1]])[-1]
    pool.rollback(0, ctx)
    got = compiled(tok, pos, ctx, ctx + 1)[-1]
    print(f"compile {time.perf_counter() - t0:.1f} s; max |compiled - eager| {(got - eager_logits).abs().max():.2e}")

    def cstep():
        compiled(tok, pos, ctx, ctx + 1).argmax().item()

    eager, comp = [], []
    for r in range(args.rounds):  # interleaved, the order alternating
        for fn, out in ((step, eager), (cstep, comp)) if r % 2 == 0 else ((cstep, comp), (step, eager)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    e, c = statistics.median(eager[3:]) * 1e3, statistics.median(comp[3:]) * 1e3
    print(f"eager {e:.1f} ms, compiled {c:.1f} ms: compiled / eager {c / e:.2f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            cstep()
    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:5]:
        ms = ev.self_cpu_time_total / 5 / 1e3
        print(f"  compiled: {ev.key[:50]:50s} {ms:7.2f} ms/step  calls {ev.count / 5:4.0f}")


if __name__ == "__main__":
    main()
