"""Do seeded and greedy requests repeat on a busy server (issue 32)? And what does a seeded request pay?

    python scripts/seeded_busy.py --server http://127.0.0.1:8000 [--prompts 4] [--repeats 6] [--mates 3]
        [--max-tokens 48] [--temperature 1.0] [--out result.json]

Against a running server (the default pair: `adasd serve`). `--mates` clients keep sending other
requests the whole time (every method, temperatures 0, 0.7 and 1.0, seeded and not) while each probe
runs beside them: for each of `--prompts` held-out chat prompts, `--repeats` times, a seeded request
(`--temperature`, one fixed seed), a greedy one and an unseeded one at the same temperature, in an
order that rotates. Reports, per kind, the prompts that gave one text per system_fingerprint, and the
tokens per second of seeded against unseeded probes (the same load, interleaved; medians per prompt,
then over prompts): what reproducibility costs a request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

PROMPTS = Path(__file__).resolve().parents[1] / "adasd_core" / "bench" / "prompts" / "smollm2_eval.jsonl"
METHODS = ("ar", "vanilla", "adasd", "hybrid", "gen-only", "verify-only")


def held_out(n: int) -> list[str]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    chat = [r["prompt"] for r in rows if r.get("kind") == "chat"]
    step = max(1, len(chat) // n)
    return chat[::step][:n]


def chat(http: httpx.Client, model: str, prompt: str, **body) -> dict:
    t0 = time.perf_counter()
    r = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                                 **body})
    r.raise_for_status()
    data = r.json()
    return {"text": data["choices"][0]["message"]["content"], "fingerprint": data.get("system_fingerprint"),
            "tokens": data["usage"]["completion_tokens"], "seconds": time.perf_counter() - t0}


def mate(i: int, max_tokens: int) -> dict:
    sampling = ({"temperature": 0}, {"temperature": 0.7}, {"temperature": 1.0, "seed": 1000 + i},
                {"temperature": 1.0})[i % 4]
    return {"max_tokens": max_tokens // 2 + 8 * (i % 4), **sampling,
            "adasd": {"method": METHODS[i % len(METHODS)], "verification": ("bayes", "threshold")[i % 2]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--mates", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    http = httpx.Client(base_url=args.server, headers=headers, timeout=600)
    model = http.get("/v1/models").json()["data"][0]["id"]
    prompts = held_out(args.prompts)
    others = held_out(64)

    stop = threading.Event()
    mates_done = [0]

    def keep_busy(k: int) -> None:
        with httpx.Client(base_url=args.server, headers=headers, timeout=600) as h:
            i = k
            while not stop.is_set():
                chat(h, model, others[i % len(others)], **mate(i, args.max_tokens))
                mates_done[0] += 1
                i += args.mates

    threads = [threading.Thread(target=keep_busy, args=(k,), daemon=True) for k in range(args.mates)]
    for t in threads:
        t.start()
    time.sleep(2.0)  # the mates are in the batch before the first probe
    kinds = {"seeded": {"temperature": args.temperature, "seed": args.seed},
             "greedy": {"temperature": 0},
             "unseeded": {"temperature": args.temperature}}
    seen: dict[str, dict[str, dict[str, list[str]]]] = {k: {p: {} for p in prompts} for k in kinds}
    rates: dict[str, dict[str, list[float]]] = {k: {p: [] for p in prompts} for k in kinds}
    t_start = time.perf_counter()
    try:
        for r in range(args.repeats):
            for j, prompt in enumerate(prompts):
                order = list(kinds)[(r + j) % 3:] + list(kinds)[:(r + j) % 3]
                for kind in order:
                    out = chat(http, model, prompt, max_tokens=args.max_tokens, **kinds[kind])
                    seen[kind][prompt].setdefault(out["fingerprint"], []).append(out["text"])
                    rates[kind][prompt].append(out["tokens"] / out["seconds"])
            print(f"repeat {r + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join()
    report = {"server": args.server, "model": model, "prompts": len(prompts), "repeats": args.repeats,
              "mates": args.mates, "mate_requests": mates_done[0], "max_tokens": args.max_tokens,
              "temperature": args.temperature}
    for kind in ("seeded", "greedy"):
        one = sum(all(len(set(texts)) == 1 for texts in by_fp.values()) for by_fp in seen[kind].values())
        report[kind] = {"prompts_with_one_text_per_fingerprint": one,
                        "fingerprints": sorted({fp for by_fp in seen[kind].values() for fp in by_fp}),
                        "texts_per_prompt": [len({t for ts in by_fp.values() for t in ts})
                                             for by_fp in seen[kind].values()]}
    per_prompt = {k: [statistics.median(rates[k][p]) for p in prompts] for k in kinds}
    report["tokens_per_s"] = {k: round(statistics.median(v), 2) for k, v in per_prompt.items()}
    report["seeded_over_unseeded"] = round(statistics.median(
        s / u for s, u in zip(per_prompt["seeded"], per_prompt["unseeded"])), 3)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
