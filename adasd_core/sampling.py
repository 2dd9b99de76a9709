"""Request sampling parameters and the logits -> probabilities processing both models share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adasd_core import paged_attention
from adasd_core.errors import InvalidRequestError
from adasd_core.grammar import GrammarSpec


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N target logprobs per generated token
    prompt_logprobs: int | None = None  # top-N target logprobs per prompt token (scoring: echo with logprobs)
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability (after temperature)
    # the controls below change the logits at every position, draft and target alike (logits_processors.py)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (-100: never, in practice)
    presence_penalty: float = 0.0  # minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times its count in the generated tokens
    repetition_penalty: float = 1.0  # a seen token's (prompt or output) logit divided (> 0) or multiplied (< 0) by it
    stop_token_ids: list[int] = field(default_factory=list)  # end the output like EOS
    grammar: GrammarSpec | None = None  # the output must match it (grammar.py)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise InvalidRequestError("max_tokens must be at least 0 (0: generate nothing)", param="max_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError("temperature must be between 0 and 100", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError("top_k must be >= 0 (0 disables it)", param="top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError("logprobs must be between 0 and 20", param="logprobs")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequestError("prompt_logprobs must be between 0 and 20", param="prompt_logprobs")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p must be between 0 and 1", param="min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be between -2 and 2", param=name)
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise InvalidRequestError("repetition_penalty must be in (0, 100]", param="repetition_penalty")
        if self.logit_bias and any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise InvalidRequestError("logit_bias values must be between -100 and 100", param="logit_bias")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty", param="stop")

    @property
    def controls(self) -> bool:
        """Whether the logits change before processing (bias or penalties)."""
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty) or \
            self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        # a denormal temperature would overflow the logits; below 1e-5 sampling is argmax anyway
        return self.temperature < 1e-5


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities after temperature, top-k and top-p.

    Greedy requests get the plain softmax: it feeds the JS distance, the argmax is unchanged.
    """
    logits = logits.float()
    if params.greedy:
        return torch.softmax(logits, dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if params.top_p < 1.0:
        probs = top_p_filter(probs, params.top_p)
    return probs


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep each row's smallest set of most likely tokens whose mass reaches top_p, renormalised.

    The nucleus is found among the row's top-k, k growing until it holds top_p of the mass: the
    same tokens as a full sort, without sorting the whole vocabulary (milliseconds a row at 49k)."""
    V = probs.size(-1)
    k = min(V, 64)
    while True:
        vals, order = probs.topk(k, dim=-1)  # sorted, largest first
        before = vals.cumsum(-1) - vals
        if k == V or bool((before[..., -1] + vals[..., -1] >= top_p).all()):
            break
        k = min(V, k * 8)
    # drop a token once the mass before it already reaches top_p; the top token always stays
    drop = before >= top_p
    drop[..., 0] = False  # a top_p below float32's smallest value would drop it too
    kept = vals.masked_fill(drop, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, kept)
    return out / out.sum(-1, keepdim=True)


# how a seeded request's draws are made: a response's system_fingerprint names it (another scheme, another text)
SEEDED_DRAWS = "exponential-race-f64"


def categorical(probs: torch.Tensor, generator: torch.Generator | None, stable: bool = False) -> torch.Tensor:
    """One draw per row of probs [..., V] (non-negative, need not sum to 1) -> [...] token ids.
    `stable`: by the exponential race (race), for requests whose text must repeat."""
    if stable:
        return race(probs, exponentials(probs.shape, generator, probs.device))
    u = torch.rand(probs.shape[:-1], dtype=torch.float64, device=probs.device, generator=generator)
    return inverse_cdf(probs, u)


def exponentials(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """Exp(1) draws of `shape`, float64: the smallest of 49k draws decide the race, and float32's
    24-bit uniforms would round them by ~0.3% (a zero uniform gives +inf, a key of 0 in race)."""
    return torch.rand(shape, dtype=torch.float64, device=device, generator=generator).log_().neg_()


def top_token(probs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [..., V] -> the index of each row's largest value (the first, on ties): argmax's answer; with
    `rows` [N], of probs[rows] without gathering them. On the CPU the library's pass takes about 7 us a row
    of a 49k vocabulary (max's indices about 20, argmax's 64)."""
    if paged_attention.takes_rows(probs):
        if rows is None:
            rows = torch.arange(probs.size(0))
        return paged_attention.row_argmax(probs, rows)
    return (probs if rows is None else probs[rows]).max(-1).indices


def race(probs: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Rows of probs [..., V] (non-negative, need not sum to 1) and Exp(1) draws e [..., V] -> the token
    of each row with the largest p_i / e_i: a draw from p / sum(p), exactly.

    Unlike inverse_cdf, the draw moves only when two tokens' keys swap, so the last bits in which a
    batched kernel's probabilities differ from a single row's almost never change it; inverse_cdf moves
    whenever its uniform falls near any boundary of the cumulative sum, and over tens of thousands of
    tail tokens one is near more often than not. The price: V uniforms a draw (seeded requests only)."""
    return top_token(probs.double() / e)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows of probs [..., V] (non-negative, need not sum to 1) and uniforms u [...] in [0, 1) ->
    the token of each row whose cumulative mass first exceeds u of the row's total.

    Exact like torch.multinomial, which on the CPU costs milliseconds per draw over a large
    vocabulary (this: tens of microseconds), and without a host sync: the target is kept strictly
    below the total, so rounding can never land on a trailing token without mass."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    value = torch.minimum(u.double()[..., None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, value, right=True).clamp_max(probs.size(-1) - 1).squeeze(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None, greedy: bool) -> torch.Tensor:
    """[N, V] -> [N] token ids."""
    if greedy:
        return top_token(probs)
    return categorical(probs, generator)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _processing_key(params: SamplingParams) -> tuple:
    return (True,) if params.greedy else (False, params.temperature, params.top_k, params.top_p, params.min_p)


def logits_to_probs_rows(logits: torch.Tensor, row_params: list[SamplingParams]) -> torch.Tensor:
    """[N, V] logits, one request's params per row -> [N, V] probabilities, each row exactly as
    logits_to_probs would give it alone (rows with the same processing run together)."""
    assert logits.shape[0] == len(row_params)
    keys = [_processing_key(p) for p in row_params]
    if all(k == keys[0] for k in keys):
        return logits_to_probs(logits, row_params[0])
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    groups: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    for rows in groups.values():
        idx = torch.tensor(rows, device=logits.device)
        out[idx] = logits_to_probs(logits[idx], row_params[rows[0]])
    return out


def sample_rows(probs: torch.Tensor, row_params: list[SamplingParams],
                generators: list[torch.Generator]) -> torch.Tensor:
    """[N, V] -> [N] token ids; sampled rows draw from their own request's generator (a seeded one by
    the exponential race: its text repeats in any batch)."""
    out = top_token(probs)
    for i, (params, gen) in enumerate(zip(row_params, generators)):
        if not params.greedy:
            out[i] = categorical(probs[i], gen, stable=params.seed is not None)
    return out
