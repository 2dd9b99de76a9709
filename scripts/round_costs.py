"""What a speculative round's parts cost on the default pair: the target over B sequences of 200 tokens
with 1..6 rows each (a decode, then verifies of 1..5 candidates), and one self-draft step of B rows timed
right after a target forward (ms, medians of 9). Run it alone on the cores.

    python scripts/round_costs.py
"""

import statistics
import time

import torch

from adasd_core import kv_cache
from adasd_core.models import load_pair

CONTEXT = 200


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    pair = load_pair(device="cpu", max_model_len=2048)
    for B in (1, 4, 8, 16):
        pool = kv_cache.make_pool(pair.target, B, 1024)
        draft = kv_cache.SharedPool(pair.draft.lean_model(), pool)
        gen = torch.Generator().manual_seed(B)
        for s in range(B):
            pool.forward([s], [torch.randint(0, 49000, (CONTEXT,), generator=gen).tolist()])
        slots = list(range(B))

        def back(pool=pool, slots=slots) -> None:
            for s in slots:
                pool.rollback(s, CONTEXT)

        row = []
        for n in range(1, 7):
            feeds = [torch.randint(0, 49000, (n,), generator=gen).tolist() for _ in slots]
            times = []
            for _ in range(9):
                t = time.perf_counter()
                pool.forward(slots, feeds, all_logits=n > 1).argmax(-1).tolist()
                times.append(time.perf_counter() - t)
                back()
            row.append(median_ms(times))
        steps = []
        for _ in range(9):
            pool.forward(slots, [[5]] * B)  # the target's weights evict the draft's, as in a round
            back()
            t = time.perf_counter()
            draft.forward(slots, [[7]] * B).argmax(-1).tolist()
            steps.append(time.perf_counter() - t)
            back()
        print(f"B={B} target, 1..6 rows each (ms): {' '.join(f'{x:.1f}' for x in row)} | "
              f"draft step {median_ms(steps):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
