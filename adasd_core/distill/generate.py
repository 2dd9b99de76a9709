"""The target writes the draft's training text, batched through the engine (method `ar`), and keeps
its own top-k log-probabilities at every token it writes: the distributions the draft learns."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

MARK = "\x00adasd-message\x00"


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int
    top_p: float = 1.0


@dataclass
class Written:
    """What the target wrote after a prompt: tokens and, for each, its top-k (ids, log-probs)."""

    tokens: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    finish_reason: str


def user_turn(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after a user message in the chat template (with the assistant's opening)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(MARK)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return enc(before), enc(after)


def chat_prompt(tokenizer, message: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def write(engine, jobs: list[Job], top_k: int = 20, on_done: Callable[[int], None] | None = None,
          on_result: Callable[[int, Written], None] | None = None) -> list[Written]:
    """Run every job through the engine, up to its slots at a time (continuous batching); on_result(i,
    written) as each finishes (a caller saving as it goes never waits for a batch to drain)."""
    from adasd_core.engine import SpecConfig
    from adasd_core.sampling import SamplingParams

    spec = SpecConfig(method="ar")
    results: list[Written | None] = [None] * len(jobs)
    pending = deque(range(len(jobs)))
    inflight: dict = {}
    done = 0
    while pending or inflight:
        while pending and engine.free_slots > 0:
            i = pending.popleft()
            job = jobs[i]
            params = SamplingParams(max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                                    seed=job.seed, logprobs=top_k)
            seq = engine.new_sequence(job.prompt_ids, params, spec)
            engine.add(seq)
            inflight[seq] = (i, Written([], [], [], ""))
        for seq, event in engine.step():
            if isinstance(event, Exception):
                raise event
            i, out = inflight[seq]
            out.tokens.extend(event.token_ids)
            for lp in event.logprobs or []:
                out.top_ids.append([t for t, _ in lp.top])
                out.top_logprobs.append([v for _, v in lp.top])
            if seq.finished:
                out.finish_reason = seq.finish_reason
                results[i] = out
                del inflight[seq]
                done += 1
                if on_result:
                    on_result(i, out)
                if on_done:
                    on_done(done)
    return results  # type: ignore[return-value]
