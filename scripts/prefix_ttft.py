"""Time to first token of a request whose long prefix the server has seen, against the same request cold.

For each round a fresh prefix of about --prefix-tokens tokens (a numbered list of facts opened by a
random nonce, so no earlier round's blocks match) is sent twice through /v1/completions, streamed:
first cold, then with another question after the same prefix (its blocks cached). Rounds alternate
which question goes first. Prints each round's pair and the medians, and the ratio warm / cold.

    python scripts/prefix_ttft.py --server http://127.0.0.1:8000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import httpx

FACTS = ["the river runs north past the mill", "the bakery opens at six", "the bridge was rebuilt in stone",
         "the library keeps maps of every street", "the market sells fish on fridays", "the tower bell rings at noon",
         "the school has a garden of herbs", "the harbour holds forty boats", "the station clock runs two minutes fast",
         "the old wall circles the hill"]


def prefix(nonce: int, n_tokens: int, tokenize) -> str:
    """About n_tokens of numbered notes opened by the nonce (line count extrapolated from 10 lines)."""

    def text(n: int) -> str:
        lines = [f"Notes {nonce}. Read them and answer the question at the end."]
        lines += [f"{i + 1}. In town {i % 7}, {FACTS[i % len(FACTS)]}." for i in range(n)]
        return "\n".join(lines) + "\n"

    per_line = tokenize(text(10)) / 10
    return text(max(1, round(n_tokens / per_line)))


def first_token_s(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first, text = None, []
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0].get("text", "") if chunk.get("choices") else ""
            if piece and first is None:
                first = time.perf_counter() - t0
            text.append(piece)
    return (first if first is not None else time.perf_counter() - t0), "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:8000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with httpx.Client(base_url=args.server, timeout=600) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]

        def tokenize(text: str) -> int:  # the server's own count: a 1-token completion's prompt_tokens
            body = {"model": model, "prompt": text, "max_tokens": 0, "echo": True}
            r = client.post("/v1/completions", json=body)
            return r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else len(text) // 4

        questions = ["Question: which town keeps maps? Answer:", "Question: when does the bakery open? Answer:"]
        rows = []
        # counted on a probe nonce (a scored prompt is cached too); the rounds' nonces have as many digits,
        # and a different first line changes every block's key after it, so nothing of the probe matches
        probe = rng.randrange(10**8, 10**9)
        template = prefix(probe, args.prefix_tokens, tokenize)
        for i in range(args.rounds):
            text = template.replace(str(probe), str(rng.randrange(10**8, 10**9)))
            order = questions if i % 2 == 0 else questions[::-1]
            cold, _ = first_token_s(client, model, text + order[0], args.max_tokens)
            warm, _ = first_token_s(client, model, text + order[1], args.max_tokens)
            rows.append((cold, warm))
            print(f"round {i + 1}: cold {cold * 1e3:.0f} ms, warm {warm * 1e3:.0f} ms ({warm / cold:.3f}x)", flush=True)
        cold_m, warm_m = statistics.median(c for c, _ in rows), statistics.median(w for _, w in rows)
        print(json.dumps({"prefix_tokens": args.prefix_tokens, "rounds": args.rounds, "cold_ms": round(cold_m * 1e3, 1),
                          "warm_ms": round(warm_m * 1e3, 1), "warm_over_cold": round(warm_m / cold_m, 3),
                          "per_round_ratio": [round(w / c, 3) for c, w in rows]}))


if __name__ == "__main__":
    main()
