"""The round loop that serves all five methods of shared/ADASD.md.

One round: the draft proposes candidates one by one (fixed K, or until its entropy exceeds T_G),
the target scores all of them plus the bonus position in one forward pass, candidates are
accepted in order by the standard check or the relaxed JS check, and the round emits the
accepted candidates plus one correction or bonus token. Both caches are then cut back.

Cache invariant between rounds: the target cache holds every token but the last; the draft
cache holds a prefix of that (it lags by one token after a fully accepted round). Before the
first round the target cache holds the whole prompt and its last logits are kept, as a
transformers generate() prefill does, so no forward is spent on the prompt's last token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from adasd_core.detokenize import IncrementalDetokenizer, StopStringMatcher
from adasd_core.drafting import WINDOW, CappedEntropyStop, DraftPolicy, EntropyStop, FixedK
from adasd_core.errors import ContextLengthError, InvalidRequestError
from adasd_core.kv_cache import cache_length, forward, new_cache, rollback
from adasd_core.models import ModelPair
from adasd_core.sampling import SamplingParams, logits_to_probs, make_generator, sample
from adasd_core.stats import GenerationStats
from adasd_core.verification import (
    RelaxedCheck,
    bonus_token,
    correction_token,
    entropy,
    js_distance,
    make_relaxed_check,
    standard_check,
)

METHODS = ("ar", "vanilla", "gen-only", "verify-only", "adasd", "hybrid")
VERIFICATIONS = ("bayes", "threshold", "none")


@dataclass
class SpecConfig:
    """Which method a request runs. `verification` applies to verify-only, adasd and hybrid;
    `k` is the fixed draft length of vanilla and verify-only, and hybrid's first cap."""

    method: str = "adasd"
    k: int = 5
    verification: str = "bayes"
    window: int = WINDOW
    trace: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidRequestError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}", param="method")
        if self.verification not in VERIFICATIONS:
            raise InvalidRequestError(
                f"unknown verification {self.verification!r}: use one of {', '.join(VERIFICATIONS)}", param="verification"
            )
        if not 1 <= self.k <= WINDOW:
            raise InvalidRequestError(f"k must be between 1 and {WINDOW}", param="k")
        if not 1 <= self.window <= WINDOW:
            raise InvalidRequestError(f"window must be between 1 and {WINDOW}", param="window")

    def draft_policy(self) -> DraftPolicy | None:
        if self.method == "ar":
            return None
        if self.method in ("vanilla", "verify-only"):
            return FixedK(self.k)
        if self.method == "hybrid":
            return CappedEntropyStop(self.window, cap=min(self.k, self.window))
        return EntropyStop(self.window)

    def relaxed_check(self) -> RelaxedCheck:
        relaxed = self.method in ("verify-only", "adasd", "hybrid")
        return make_relaxed_check(self.verification if relaxed else "none")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """What one round adds to a request's output."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats
    logprobs: list[TokenLogprob] | None = None


class Generation:
    """One request's decoding state; `step()` runs one round. Owned by one thread at a time."""

    def __init__(self, engine: "SpeculativeEngine", prompt_ids: list[int], params: SamplingParams, spec: SpecConfig):
        pair = engine.pair
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty: send at least one token", param="prompt")
        if len(prompt_ids) >= pair.context_length:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {pair.context_length} tokens "
                "and at least one must be left for the completion"
            )
        bad = [t for t in prompt_ids if not 0 <= t < pair.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (0..{pair.vocab_size - 1})", param="prompt")
        self.engine = engine
        self.pair = pair
        self.params = params
        self.spec = spec
        self.policy = spec.draft_policy() if pair.draft is not None else None
        if spec.method != "ar" and pair.draft is None:
            raise InvalidRequestError(f"method {spec.method!r} needs a draft model; this server has none", param="method")
        self.relaxed = spec.relaxed_check()
        self.generator = make_generator(params.seed, pair.device)
        self.tokens = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.finish_reason: str | None = None
        self.stats = GenerationStats(method=spec.method, prompt_tokens=len(prompt_ids), target_step_s=engine.target_step_s)
        if spec.trace:
            self.stats.trace = []
        self.detok = IncrementalDetokenizer(pair.tokenizer, prompt_ids)
        self.stop = StopStringMatcher(params.stop)
        self.eos = set() if params.ignore_eos else pair.eos_token_ids
        self._decode_s = 0.0

        t0 = time.perf_counter()
        self.target_cache = new_cache(pair.target)
        self.draft_cache = new_cache(pair.draft) if self.policy is not None else None
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=pair.input_device)
        # the target reads the whole prompt, so the first round starts from its last logits [1, V];
        # the draft reads all but the last token, which its first step feeds
        self._pending_logits = forward(pair.target, prompt, self.target_cache, logits_to_keep=1)
        self.stats.target_forwards += 1
        if self.draft_cache is not None and len(prompt_ids) > 1:
            forward(pair.draft, prompt[:-1].to(pair.device), self.draft_cache, logits_to_keep=1)
            self.stats.draft_forwards += 1
        self.prefill_s = time.perf_counter() - t0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def close(self) -> None:
        """Free both caches now (a cancelled request must not hold memory until GC)."""
        self.target_cache = self.draft_cache = None
        if self.finish_reason is None:
            self.finish_reason = "abort"

    # ------------------------------------------------------------------ one round

    def step(self) -> Delta:
        assert not self.finished, "step() after the generation finished"
        t_start = time.perf_counter()
        remaining = min(self.params.max_tokens - self.generated, self.pair.context_length - len(self.tokens))
        assert remaining >= 1
        max_candidates = remaining - 1  # the round always adds one target token
        if self.policy is None or max_candidates == 0:
            candidates, draft_probs, entropies = [], None, []
        else:
            candidates, draft_probs, entropies = self._draft(max_candidates)
        t_drafted = time.perf_counter()
        emitted, logprobs = self._verify(candidates, draft_probs, entropies)
        t_verified = time.perf_counter()

        delta = self._emit(emitted, logprobs)
        t_end = time.perf_counter()
        s = self.stats
        s.time_draft_s += t_drafted - t_start
        s.time_verify_s += t_verified - t_drafted
        s.time_other_s += t_end - t_verified
        self._decode_s += t_end - t_start
        s.wall_s = self._decode_s
        if self.finished:
            s.entropy_threshold = self.policy.threshold if self.policy else None
            s.__dict__.update(self.relaxed.state())
        return delta

    def _draft(self, max_candidates: int):
        """Propose up to max_candidates tokens. Returns ids, draft_probs [k, V], entropies."""
        pair, params, policy = self.pair, self.params, self.policy
        cap = min(max_candidates, policy.k if isinstance(policy, FixedK) else policy.window)
        feed = torch.tensor(self.tokens[cache_length(self.draft_cache):], dtype=torch.long, device=pair.device)
        ids, probs, ents = [], [], []
        for i in range(cap):
            logits = forward(pair.draft, feed, self.draft_cache, logits_to_keep=1)[-1:, : pair.vocab_size]
            self.stats.draft_forwards += 1
            q = logits_to_probs(logits, params)  # [1, V]
            x = sample(q, self.generator, params.greedy)  # [1]
            if policy.uses_entropy:
                vals = torch.cat([x.float(), entropy(q)]).tolist()  # one host sync
                token, h = int(vals[0]), vals[1]
            else:
                token, h = int(x), 0.0
            ids.append(token)
            probs.append(q)
            ents.append(h)
            if token in self.eos or not policy.keep_drafting(h, i + 1):
                break
            feed = x
        return ids, torch.cat(probs), ents

    def _verify(self, candidates: list[int], draft_probs, entropies: list[float]):
        """Score candidates + bonus with one target forward; returns emitted ids and logprobs."""
        pair, params, gen = self.pair, self.params, self.generator
        k = len(candidates)
        if self._pending_logits is None:  # the cache lacks the last token: feed it before the candidates
            feed = torch.tensor([self.tokens[-1], *candidates], dtype=torch.long, device=pair.input_device)
            logits = forward(pair.target, feed, self.target_cache)
            self.stats.target_forwards += 1
        else:  # first round: the prefill already scored the position after the prompt
            logits = self._pending_logits
            if k:
                feed = torch.tensor(candidates, dtype=torch.long, device=pair.input_device)
                logits = torch.cat([logits, forward(pair.target, feed, self.target_cache)])
                self.stats.target_forwards += 1
            self._pending_logits = None
        logits = logits[:, : pair.vocab_size].to(pair.device)  # [k+1, V]
        target_probs = logits_to_probs(logits, params)

        n_accepted, n_standard, n_relaxed, flags = 0, 0, 0, []
        if k:
            cand = torch.tensor(candidates, device=pair.device)
            std = standard_check(cand, target_probs[:k], draft_probs, params.greedy, gen).tolist()
            use_relaxed = self.relaxed.name != "none"
            d = js_distance(target_probs[:k], draft_probs).tolist() if use_relaxed else None
            draws = torch.rand(k, generator=gen, device=pair.device).tolist() if (use_relaxed and not params.greedy) else None
            for i in range(k):
                if std[i]:
                    ok, n_standard = True, n_standard + 1
                elif use_relaxed:  # the posterior is only needed where the standard check failed
                    p_accept = self.relaxed.accept_probability([d[i]])[0]
                    ok = p_accept > 0.5 if params.greedy else draws[i] < p_accept
                    n_relaxed += ok
                else:
                    ok = False
                flags.append(bool(ok))
                if not ok:
                    break
                n_accepted += 1
            # the statistics learn after the round, from the candidates examined (len(flags)), labelled by
            # the standard check
            examined = range(len(flags))
            if use_relaxed:
                for i in examined:
                    self.relaxed.observe(d[i], bool(std[i]))
            self.policy.update([entropies[i] for i in examined if not std[i]], all_accepted=n_accepted == k)

        if n_accepted < k:
            extra = correction_token(target_probs[n_accepted], draft_probs[n_accepted], params.greedy, gen)
        else:
            extra = bonus_token(target_probs[k], params.greedy, gen)
        emitted = candidates[:n_accepted] + [extra]
        self.stats.observe_round(k, n_standard, n_relaxed, bonus=k > 0 and n_accepted == k, accepted_flags=flags)
        if self.stats.trace is not None:
            self.stats.trace.append({"entropy_threshold": self.policy.threshold if self.policy else None, **self.relaxed.state(),
                                     "drafted": k, "accepted": n_accepted})

        # target cache: keep the sequence up to the last accepted candidate (the new last token is not in it)
        rollback(self.target_cache, len(self.tokens) + n_accepted)
        if self.draft_cache is not None:
            rollback(self.draft_cache, min(cache_length(self.draft_cache), len(self.tokens) + n_accepted))

        logprobs = None
        if params.logprobs is not None:
            logprobs = _token_logprobs(logits[: n_accepted + 1], emitted, params.logprobs)
        return emitted, logprobs

    def _emit(self, emitted: list[int], logprobs) -> Delta:
        """Append tokens, apply EOS / length / stop strings, and produce the text delta."""
        for i, t in enumerate(emitted):
            if t in self.eos:
                emitted = emitted[: i + 1]
                logprobs = logprobs[: i + 1] if logprobs is not None else None
                self.finish_reason = "stop"
                break
        self.tokens.extend(emitted)
        self.stats.generated_tokens = self.generated
        if self.finish_reason is None and (
            self.generated >= self.params.max_tokens or len(self.tokens) >= self.pair.context_length
        ):
            self.finish_reason = "length"
        text_ids = [t for t in emitted if t not in self.eos]
        text = self.detok.push(text_ids)
        if self.finished:
            text += self.detok.flush()
        text, stopped = self.stop.push(text)
        if stopped:
            self.finish_reason = "stop"
        elif self.finished:
            text += self.stop.flush()
        if self.finished:
            self.target_cache = self.draft_cache = None
        return Delta(text=text, token_ids=emitted, finish_reason=self.finish_reason, logprobs=logprobs)


def _token_logprobs(logits: torch.Tensor, tokens: list[int], top_n: int) -> list[TokenLogprob]:
    """Raw target log-probabilities (temperature 1) of emitted tokens, with the top-N alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None]).squeeze(-1).tolist()
    top_vals, top_ids = (logp.topk(top_n, dim=-1) if top_n else (logp[:, :0], logp[:, :0].long()))
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [
        TokenLogprob(t, lp, list(zip(ids, vals))) for t, lp, ids, vals in zip(tokens, chosen, top_ids, top_vals)
    ]


@torch.inference_mode()
def decode_step_seconds(model, pair: ModelPair, context: int = 64, repeats: int = 9) -> float:
    """Median wall time of one single-token decode step after `context` cached tokens,
    including the host sync a real step pays to read its token."""
    n = min(context, pair.context_length - 2)
    device = model.get_input_embeddings().weight.device
    ids = torch.arange(n, device=device) % pair.vocab_size
    cache = new_cache(model)
    forward(model, ids, cache, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward(model, ids[:1], cache, logits_to_keep=1)[-1].argmax().item()
        times.append(time.perf_counter() - t0)
        rollback(cache, n)
    times.sort()
    return times[len(times) // 2]


class SpeculativeEngine:
    """Holds a loaded pair; starts generations. Not thread-safe: one worker thread drives it."""

    def __init__(self, pair: ModelPair, default_spec: SpecConfig | None = None, calibrate: bool = True):
        self.pair = pair
        self.default_spec = default_spec or SpecConfig()
        self.target_step_s = self.calibrate() if calibrate else 0.0

    # ---------------------------------------------------------------- helpers

    def encode(self, text: str) -> list[int]:
        return self.pair.tokenizer(text, add_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.pair.tokenizer.decode(ids, skip_special_tokens=True)

    def calibrate(self) -> float:
        """Measure one single-token target decode step: the unit of the speedup estimate."""
        self.target_step_s = decode_step_seconds(self.pair.target, self.pair)
        return self.target_step_s

    # ---------------------------------------------------------------- API

    def start(self, prompt: str | list[int], params: SamplingParams | None = None, spec: SpecConfig | None = None) -> Generation:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(self, ids, params or SamplingParams(), spec or self.default_spec)

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None, spec: SpecConfig | None = None) -> Iterator[Delta]:
        gen = self.start(prompt, params, spec)
        try:
            while not gen.finished:
                yield gen.step()
        finally:
            gen.close()

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, spec: SpecConfig | None = None) -> GenerationResult:
        gen = self.start(prompt, params, spec)
        text, ids, logprobs = [], [], [] if (params and params.logprobs is not None) else None
        while not gen.finished:
            d = gen.step()
            text.append(d.text)
            ids.extend(d.token_ids)
            if logprobs is not None and d.logprobs:
                logprobs.extend(d.logprobs)
        return GenerationResult("".join(text), ids, gen.finish_reason, gen.stats, logprobs)
