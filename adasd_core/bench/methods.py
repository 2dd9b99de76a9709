"""The benchmark's rows: each method runs one request (prompt ids in, token ids out) and is timed
the same way, end to end: from the call with the prompt's token ids to the returned tokens, so
prefill is included for every row (the engine's own `wall_s` leaves it out; it is kept as
`decode_s`).

Rows: the draft alone and the target alone (our loop, method `ar`), the target alone through
transformers' `generate()` (the reference autoregressive loop), vanilla SD, transformers' assisted
generation with its default candidate schedule, gen-only, verify-only, AdaSD (two checks) and our hybrid.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from adasd_core.engine import SpecConfig
from adasd_core.llm import LLM
from adasd_core.models import ModelPair
from adasd_core.sampling import SamplingParams


@dataclass
class Run:
    """One request's outcome."""

    token_ids: list[int]
    seconds: float  # end to end, prefill included
    rounds: int | None = None  # target forwards that produced tokens (None: not a speculative row)
    drafted: int | None = None
    accepted: int | None = None
    decode_s: float | None = None  # engine rows: decode time without prefill
    accepted_by_position: list[int] | None = None
    drafted_by_position: list[int] | None = None
    trace: list[dict] | None = None
    finish_reason: str | None = None
    relaxed: int | None = None  # candidates only the relaxed check accepted (engine rows)


class Method:
    key: str = ""
    label: str = ""
    speculative: bool = False
    lossless: bool = True  # greedy output must equal the target's (lossy: draft alone, relaxed checks)

    def run(self, prompt_ids: list[int], params: SamplingParams, trace: bool = False) -> Run:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        return {"key": self.key, "label": self.label, "lossless": self.lossless}


class EngineMethod(Method):
    """A method of our round loop (shared/ADASD.md)."""

    def __init__(self, key: str, label: str, engine: LLM, spec: SpecConfig, lossless: bool):
        self.key, self.label, self.engine, self.spec, self.lossless = key, label, engine, spec, lossless
        self.speculative = spec.method != "ar"

    def run(self, prompt_ids: list[int], params: SamplingParams, trace: bool = False) -> Run:
        spec = dataclasses.replace(self.spec, trace=True) if trace else self.spec
        t0 = time.perf_counter()
        res = self.engine.generate(prompt_ids, params, spec)
        seconds = time.perf_counter() - t0
        s = res.stats
        spec_row = self.speculative
        return Run(
            token_ids=list(res.token_ids), seconds=seconds, decode_s=s.wall_s, finish_reason=res.finish_reason,
            rounds=s.rounds if spec_row else None, drafted=s.drafted_tokens if spec_row else None,
            accepted=s.accepted_tokens if spec_row else None,
            accepted_by_position=list(s.accepted_by_position) if spec_row else None,
            drafted_by_position=list(s.drafted_by_position) if spec_row else None,
            trace=s.trace, relaxed=s.accepted_relaxed if spec_row else None,
        )

    def describe(self) -> dict:
        d = super().describe()
        d["spec"] = {"method": self.spec.method, "k": self.spec.k, "verification": self.spec.verification,
                     "window": self.spec.window}
        return d


class _Counter:
    """Counts a module's forward calls with a hook (no patching of transformers)."""

    def __init__(self, module):
        self.n = 0
        self.module = module

    @contextmanager
    def counting(self):
        self.n = 0
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def _hook(self, *_):
        self.n += 1


def hf_assistant_schedule(draft) -> dict:
    """The candidate schedule transformers applies to this assistant when nothing is set: the
    assistant's generation_config completed with the library defaults (as AssistedCandidateGenerator does)."""
    try:
        from transformers.utils import is_sklearn_available
    except ImportError:  # pragma: no cover
        def is_sklearn_available():
            return False
    cfg = copy.deepcopy(draft.generation_config)
    try:
        cfg.update(**cfg._get_default_generation_params(), defaults_only=True)
    except (AttributeError, TypeError):  # older transformers keep the defaults on the config itself
        pass
    threshold = getattr(cfg, "assistant_confidence_threshold", None)
    return {
        "num_assistant_tokens": getattr(cfg, "num_assistant_tokens", None),
        "num_assistant_tokens_schedule": getattr(cfg, "num_assistant_tokens_schedule", None),
        "assistant_confidence_threshold": threshold,
        # the confidence threshold is re-fitted after every round (ROC curve) only with scikit-learn installed
        "confidence_threshold_adapts": bool(threshold) and is_sklearn_available(),
    }


class HFMethod(Method):
    """transformers' `generate()`: greedy / multinomial sampling, or assisted generation when
    `assistant` is given (for sampling, speculative sampling with the assistant's logits).

    For assisted rows: rounds = target forward calls, candidates = assistant forward calls (one
    per candidate), accepted = generated - rounds (each round adds its matches plus one token).
    """

    def __init__(self, key: str, label: str, pair: ModelPair, assistant=None):
        self.key, self.label, self.pair = key, label, pair
        self.model = pair.target
        self.assistant = assistant
        self.speculative = assistant is not None
        self.lossless = True
        tok = pair.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos = sorted(pair.eos_token_ids) or None
        self._target_calls = _Counter(self.model)
        self._draft_calls = _Counter(assistant) if assistant is not None else None

    def _kwargs(self, params: SamplingParams, prompt_len: int) -> dict:
        kw = dict(max_new_tokens=params.max_tokens, pad_token_id=self.pad_id, eos_token_id=None if params.ignore_eos
                  else self.eos)
        if params.greedy:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
        if params.stop:
            stop_text = _StopText(self.pair.tokenizer, list(params.stop), prompt_len)
            kw["stopping_criteria"] = StoppingCriteriaList([stop_text])
        if self.assistant is not None:
            kw["assistant_model"] = self.assistant
        return kw

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], params: SamplingParams, trace: bool = False) -> Run:
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.pair.input_device)
        kw = self._kwargs(params, ids.shape[1])
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with self._target_calls.counting(), (self._draft_calls.counting() if self._draft_calls else _null()):
            t0 = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            new = out[0, ids.shape[1]:].tolist()
            seconds = time.perf_counter() - t0
        finish = "stop" if (new and self.eos and new[-1] in self.eos) else "length"
        if not self.speculative:
            return Run(token_ids=new, seconds=seconds, finish_reason=finish)
        rounds = self._target_calls.n
        return Run(token_ids=new, seconds=seconds, finish_reason=finish, rounds=rounds,
                   drafted=self._draft_calls.n, accepted=max(0, len(new) - rounds))

    def describe(self) -> dict:
        d = super().describe()
        if self.assistant is not None:
            d["assistant_schedule"] = hf_assistant_schedule(self.assistant)
        return d


class _StopText(StoppingCriteria):
    """Stop once the generated text contains a stop string, wherever it completed.

    transformers' own `stop_strings` cannot be combined with `assistant_model` (the assistant's
    inner generate() gets the stop strings but no tokenizer, transformers#48039) and only sees a
    stop string that completes on the last token of an accepted block; this criterion decodes the
    whole generated text instead, for both HF rows alike.
    """

    def __init__(self, tokenizer, stop: list[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


@contextmanager
def _null():
    yield None


# ----------------------------------------------------------------------------- the row set

METHOD_KEYS = ("draft", "target", "hf-target", "vanilla", "hf-assisted", "gen-only", "verify-only", "adasd-bayes",
               "adasd-threshold", "hybrid")


def build_methods(pair: ModelPair, keys: tuple[str, ...] = METHOD_KEYS, k: int = 5, engine: LLM | None = None,
                  verify_only_check: str = "bayes") -> list[Method]:
    """The rows in the table's order. `engine` reuses a calibrated engine for `pair`."""
    unknown = [key for key in keys if key not in METHOD_KEYS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}: use any of {', '.join(METHOD_KEYS)}")
    needs_draft = [key for key in keys if key not in ("target", "hf-target")]
    if needs_draft and pair.draft is None:
        raise ValueError(f"method {needs_draft[0]!r} needs a draft model")
    from adasd_core.eagle import Eagle3Head

    standalone = [key for key in keys if key in ("draft", "hf-assisted")]
    if standalone and isinstance(pair.draft, Eagle3Head):
        raise ValueError(f"method {standalone[0]!r} runs the draft as a model of its own; an EAGLE-3 head reads "
                         "the target's states and cannot")
    engine = engine or LLM(pair)
    rows: dict[str, Method] = {}
    if "draft" in keys:
        draft_pair = dataclasses.replace(pair, target=pair.draft, draft=None)
        rows["draft"] = EngineMethod("draft", "draft alone", LLM(draft_pair), SpecConfig(method="ar"),
                                     lossless=False)
    specs = {
        "target": ("target alone", SpecConfig(method="ar"), True),
        "vanilla": (f"vanilla SD (K={k})", SpecConfig(method="vanilla", k=k), True),
        "gen-only": ("gen-only", SpecConfig(method="gen-only"), True),
        "verify-only": (f"verify-only ({verify_only_check}, K={k})",
                        SpecConfig(method="verify-only", k=k, verification=verify_only_check), False),
        "adasd-bayes": ("adasd (bayes)", SpecConfig(method="adasd", verification="bayes"), False),
        "adasd-threshold": ("adasd (threshold)", SpecConfig(method="adasd", verification="threshold"), False),
        "hybrid": (f"hybrid (bayes, cap from {k})", SpecConfig(method="hybrid", k=k, verification="bayes"), False),
    }
    for key, (label, spec, lossless) in specs.items():
        if key in keys:
            rows[key] = EngineMethod(key, label, engine, spec, lossless)
    if "hf-target" in keys:
        rows["hf-target"] = HFMethod("hf-target", "target alone (HF generate)", pair)
    if "hf-assisted" in keys:
        rows["hf-assisted"] = HFMethod("hf-assisted", "HF assisted generation", pair, assistant=pair.draft)
    return [rows[key] for key in METHOD_KEYS if key in keys]
