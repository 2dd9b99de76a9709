"""Single requests over the engine: generate, stream, or several sequences run together (the CLI,
benchmarks, tests). A server drives SpeculativeEngine itself with add() and step()."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from adasd_core.engine import SpeculativeEngine
from adasd_core.sampling import SamplingParams
from adasd_core.sequence import Delta, PromptLogprobs, Sequence, TokenLogprob
from adasd_core.spec import SpecConfig
from adasd_core.stats import GenerationStats


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # SamplingParams.prompt_logprobs: the first has none


class LLM(SpeculativeEngine):
    """The engine with a single-request API: `generate`, `stream`, `start`, `run_together`."""

    def encode(self, text: str) -> list[int]:
        return self.pair.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.pair.tokenizer.decode(ids, skip_special_tokens=True)

    def start(self, prompt: str | list[int], params: SamplingParams | None = None,
              spec: SpecConfig | None = None) -> Generation:
        if not self.idle:
            raise RuntimeError("start()/generate() need an idle engine; a server drives it with add() and step()")
        seq = self.new_sequence(prompt, params, spec)
        self.add(seq)
        return Generation(self, seq)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None,
               spec: SpecConfig | None = None) -> Iterator[Delta]:
        gen = self.start(prompt, params, spec)
        try:
            while not gen.finished:
                yield gen.step()
        finally:
            gen.close()

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 spec: SpecConfig | None = None) -> GenerationResult:
        text, ids, logprobs = [], [], [] if (params and params.logprobs is not None) else None
        gen = self.start(prompt, params, spec)
        try:
            while not gen.finished:
                d = gen.step()
                text.append(d.text)
                ids.extend(d.token_ids)
                if logprobs is not None and d.logprobs:
                    logprobs.extend(d.logprobs)
        finally:
            gen.close()
        return GenerationResult("".join(text), ids, gen.seq.finish_reason, gen.stats, logprobs, gen.prompt_logprobs)

    def run_together(self, seqs: list[Sequence]) -> list[list[int]]:
        """Add the sequences at once and step until the engine is idle: each one's tokens (batch
        experiments and tests; an error in any sequence is raised)."""
        for s in seqs:
            self.add(s)
        out: dict[int, list[int]] = {id(s): [] for s in seqs}
        while not self.idle:
            for seq, event in self.step():
                if isinstance(event, Exception):
                    raise event
                out[id(seq)].extend(event.token_ids)
        return [out[id(s)] for s in seqs]


class Generation:
    """One request driven alone through the engine; `step()` returns its next round's Delta."""

    def __init__(self, engine: SpeculativeEngine, seq: Sequence):
        self.engine = engine
        self.seq = seq
        self.prompt_logprobs: list[TokenLogprob] | None = None  # once the prompt is scored

    @property
    def finished(self) -> bool:
        return self.seq.finished

    @property
    def stats(self) -> GenerationStats:
        return self.seq.stats

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens

    def step(self) -> Delta:
        assert not self.finished, "step() after the generation finished"
        while True:
            for seq, event in self.engine.step():
                if seq is self.seq:
                    if isinstance(event, Exception):
                        raise event
                    if isinstance(event, PromptLogprobs):  # precedes a Delta of the same step or a later one
                        self.prompt_logprobs = event.logprobs
                        continue
                    return event

    def close(self) -> None:
        """Free the slot now (a cancelled request must not hold memory)."""
        self.engine.abort(self.seq)
