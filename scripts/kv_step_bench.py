"""Step times of the default pair's target, or with --draft its draft (ms, medians), on whichever adasd_core
is first on sys.path, so two versions compare side by side (PYTHONPATH=<tree>): a decode step (one token
each) and a verify row (six tokens each) for B sequences of L tokens, rolled back after every step.
Prints one JSON line."""

import argparse
import json
import statistics
import time

import torch

from adasd_core import kv_cache
from adasd_core.models import load_pair

SHAPES = [(1, 300), (4, 200), (16, 200), (16, 512)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", action="store_true", help="time the draft (as the engine loads it)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pair = load_pair(device="cpu", max_model_len=2048)
    model = pair.draft if args.draft else pair.target
    out = {}
    for B, L in SHAPES:
        pool = kv_cache.make_pool(model, B, 1024)
        gen = torch.Generator().manual_seed(B * 1000 + L)
        for s in range(B):
            pool.forward([s], [torch.randint(0, 49000, (L,), generator=gen).tolist()])
        slots = list(range(B))
        for n in (1, 6):
            feeds = [torch.randint(0, 49000, (n,), generator=gen).tolist() for _ in slots]
            times = []
            for _ in range(12):
                t = time.perf_counter()
                pool.forward(slots, feeds, all_logits=n > 1)
                times.append((time.perf_counter() - t) * 1000)
                for s in slots:
                    pool.rollback(s, L)
            out[f"B{B} L{L} n{n}"] = round(statistics.median(times[2:]), 1)  # the first two warm up
    print(json.dumps(out))


if __name__ == "__main__":
    main()
