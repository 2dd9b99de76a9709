"""Loading a target / draft pair through the real transformers path (hub id or local folder)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adasd_core import draft_head
from adasd_core.device import resolve_device, resolve_dtype
from adasd_core.errors import IncompatiblePairError, ModelLoadError
from adasd_core.model_files import (
    AUTO_DRAFT,
    SMOLLM2,
    TINY_DIR,
    ModelSource,
    host_available_bytes,
    hub_parameter_count,
    human_bytes,
    locate,
    parameter_count,
)

log = logging.getLogger(__name__)

def locate_model(name: str, role: str) -> ModelSource:
    """`smollm2` and `tiny` name the built-in pairs; anything else a local folder, a cached snapshot or
    a hub id (adasd_core.model_files.locate). Raises ModelLoadError with one actionable message."""
    return locate(name, role, tiny_dir=TINY_DIR)


def resolve_model_path(name: str, role: str) -> str:
    """What from_pretrained gets for `name`: a folder, or a hub id to download."""
    return locate_model(name, role).path


@dataclass
class ModelPair:
    target: torch.nn.Module
    draft: torch.nn.Module | None
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    context_length: int
    vocab_size: int  # logits are cut to this width for both models
    eos_token_ids: set[int] = field(default_factory=set)
    target_name: str = ""
    draft_name: str = ""

    @property
    def min_posterior(self) -> float | None:
        """BayesCheck.min_posterior as chosen on this pair's own frontier, from the draft's config
        (`adasd_draft.min_posterior`); None: the class default."""
        extra = getattr(getattr(self.draft, "config", None), "adasd_draft", None) or {}
        value = extra.get("min_posterior") if isinstance(extra, dict) else None
        return None if value is None else float(value)

    @property
    def input_device(self) -> torch.device:
        """Where input ids go: the embedding's device when a target spans several GPUs."""
        return self.target.get_input_embeddings().weight.device


def check_vocabularies(target_tok, draft_tok, target_name: str = "target", draft_name: str = "draft") -> None:
    """Refuse a pair whose tokenizers map tokens to different ids."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv == dv:
        return
    diff = None
    for token in sorted(set(tv) | set(dv), key=lambda t: (tv.get(t, dv.get(t)), t)):
        if tv.get(token) != dv.get(token):
            diff = token
            break
    raise IncompatiblePairError(
        f"target {target_name!r} and draft {draft_name!r} have different vocabularies "
        f"(sizes {len(tv)} and {len(dv)}; token {diff!r} has id {tv.get(diff)} in the target and "
        f"{dv.get(diff)} in the draft). Speculative decoding needs a draft with the target's tokenizer."
    )


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _fix_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        log.warning("the tokenizer has no EOS token: generation stops only at max_tokens or a stop string")


_MEMORY_WORDS = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory",
                 "failed to allocate", "allocation failed")


def _is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _MEMORY_WORDS)


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            return None
    if device.type == "cpu":
        return host_available_bytes()
    return None


class _Sizes:
    """Weight bytes of the pair at the load dtype (None where unknown, with the reason in `unknown`), from
    local files or, for a hub id not downloaded yet, the hub's safetensors summary: for the memory
    pre-check and the out-of-memory message."""

    def __init__(self, sources: dict[str, ModelSource], dtype: torch.dtype, device: torch.device):
        elem = torch.empty((), dtype=dtype).element_size()
        self.bytes, self.unknown = {}, {}
        for role, src in sources.items():
            n = hub_parameter_count(src.path) if src.where == "hub" else parameter_count(src.path)
            self.bytes[role] = None if n is None else n * elem
            if n is None:
                self.unknown[role] = ("the hub gives no safetensors size for it and it is not downloaded yet"
                                      if src.where == "hub" else f"{src.path} holds no safetensors or .bin weights")
        self.dtype, self.device = str(dtype).removeprefix("torch."), device

    def text(self) -> str:
        parts = [f"{role} {human_bytes(b)}" for role, b in self.bytes.items() if b is not None]
        return f"weights in {self.dtype}: {', '.join(parts)}" if parts else f"weights in {self.dtype}: size unknown"

    def total(self) -> int | None:
        known = [b for b in self.bytes.values() if b is not None]
        return sum(known) if known and len(known) == len(self.bytes) else None

    def advice(self, spread: bool = False) -> str:
        smaller = " --dtype bfloat16 halves float32 weights;" if self.dtype == "float32" else ""
        gpus = (" more or larger GPUs;" if spread else " --device-map auto spreads the target over several GPUs;"
                if self.device.type == "cuda" else "")
        return f"use a smaller pair or another --device;{smaller}{gpus} or free some memory"


def _gpus_free_bytes() -> int | None:
    """Free memory of every visible GPU together (where a device map spreads the target)."""
    try:
        return sum(torch.cuda.mem_get_info(torch.device("cuda", i))[0] for i in range(torch.cuda.device_count()))
    except (RuntimeError, AssertionError):
        return None


def _check_memory(sizes: _Sizes, device: torch.device, names: dict[str, str], device_map: str | None = None) -> None:
    """Refuse, before loading, weights that cannot fit: on `device`, or with a device map on the GPUs
    together (accelerate would put the rest in host memory or on disk, where every step reloads it),
    with the draft on `device` alone."""
    need = sizes.total()
    if need is None:
        for role, why in sizes.unknown.items():
            log.info("memory pre-check skipped: the size of the %s %r is unknown before loading (%s)", role,
                     names[role], why)
        return
    spread = bool(device_map) and device.type == "cuda"
    free = _gpus_free_bytes() if spread else _free_bytes(device)
    where = f"the {torch.cuda.device_count()} GPUs together" if spread else str(device)
    pair = " and ".join(f"{role} {names[role]!r}" for role in sizes.bytes)
    if free is not None and need > free:
        offload = (" (the device map would leave the rest in host memory or on disk, reloaded at every step)"
                   if spread else "")
        raise ModelLoadError(
            f"the {pair} do not fit on {where}: {sizes.text()} (together {human_bytes(need)}, before the KV cache), "
            f"but {human_bytes(free)} is free{offload}. To fix: {sizes.advice(spread)}.")
    draft, free_here = sizes.bytes.get("draft"), _free_bytes(device)
    if spread and draft is not None and free_here is not None and draft > free_here:
        raise ModelLoadError(
            f"the draft {names['draft']!r} ({human_bytes(draft)} in {sizes.dtype}) does not fit on {device}, which has "
            f"{human_bytes(free_here)} free. To fix: {sizes.advice()}.")


def _load_failed(role: str, name: str, source: ModelSource, what: str, exc: BaseException,
                 sizes=None) -> ModelLoadError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if _is_memory_error(exc):
        size = f" ({sizes.text()})" if sizes else ""
        return ModelLoadError(f"out of memory on {sizes.device if sizes else 'the device'} while loading the {role} "
                              f"model {name!r}{size}: {first}. To fix: "
                              f"{sizes.advice() if sizes else 'use a smaller pair or another device'}.")
    return ModelLoadError(f"could not load the {role} {what} {name!r} from {source.describe()}: {type(exc).__name__}: "
                          f"{first}. Check that it is a causal language model saved by transformers "
                          f"(--trust-remote-code for custom code), or pass 'smollm2' or 'tiny' for a built-in pair.")


def _indexed(device: torch.device) -> torch.device:
    """cuda -> cuda:N of the current card (a device map wants one card)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def load_model(name: str, device: torch.device, dtype: torch.dtype, device_map: str | None, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if device_map:
        kwargs["device_map"] = device_map
    elif device.type != "cpu":  # the weights go straight to the device: no copy in host memory first
        kwargs["device_map"] = {"": _indexed(device)}
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    model.eval()
    model.requires_grad_(False)
    if Path(name).is_dir():  # a draft whose head covers part of the vocabulary (adasd_core.draft_head)
        draft_head.attach(model, draft_head.load(name))
    return model


def default_draft(target: str, device: torch.device, dtype: torch.dtype) -> str:
    """What `--draft auto` (the default) loads: the target's own int4 copy where self-drafting runs (a
    float32 target on the CPU; on the default pair the fastest draft through the server,
    docs/selfdraft.md), else the default target's distilled draft; any other target names its draft."""
    from adasd_core.selfdraft import SELF

    if device.type == "cpu" and dtype == torch.float32:
        return SELF
    if target == SMOLLM2:
        return SMOLLM2
    raise ModelLoadError(f"--draft auto makes the draft from the target's own weights only for a float32 target on "
                         f"the CPU; on {device.type} / {str(dtype).removeprefix('torch.')} pass a draft model or an "
                         "EAGLE-3 head to --draft, or use --method ar")


def load_pair(
    target: str = SMOLLM2,
    draft: str | None = AUTO_DRAFT,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    max_model_len: int | None = None,
) -> ModelPair:
    """Load target (and draft unless None). `device_map="auto"` spreads a large target over GPUs."""
    from transformers import AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if draft == AUTO_DRAFT:
        draft = default_draft(target, dev, dt)
    sources = {"target": locate_model(target, "target")}
    if draft:
        sources["draft"] = locate_model(draft, "draft")
    names = {"target": target, "draft": draft or ""}

    def tokenizer_of(role: str):
        try:
            return AutoTokenizer.from_pretrained(sources[role].path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise _load_failed(role, names[role], sources[role], "tokenizer", exc) from exc

    tokenizer = tokenizer_of("target")
    from adasd_core import eagle, selfdraft

    own = selfdraft.is_self(draft)  # the target's own weights, quantised here
    # a head reads the target's own tokens and states
    head = own or bool(draft) and eagle.is_eagle3(sources["draft"].path)
    if draft and not head:
        check_vocabularies(tokenizer, tokenizer_of("draft"), target, draft)  # before loading any weights
    _fix_tokenizer(tokenizer)

    sizes = _Sizes({r: src for r, src in sources.items() if not (own and r == "draft")}, dt, dev)
    _check_memory(sizes, dev, names, device_map)

    def model_of(role: str, role_map: str | None):
        try:
            return load_model(sources[role].path, dev, dt, role_map, trust_remote_code)
        except (OSError, ValueError, RuntimeError, MemoryError) as exc:
            raise _load_failed(role, names[role], sources[role], "model", exc, sizes) from exc

    target_model = model_of("target", device_map)
    if own:
        draft_model = selfdraft.load(draft, target_model, tokenizer)
    elif head:
        try:
            draft_model = eagle.load(sources["draft"].path, target_model, dev, dt)
        except (OSError, ValueError, RuntimeError) as exc:
            raise _load_failed("draft", draft, sources["draft"], "EAGLE-3 head", exc, sizes) from exc
    else:
        draft_model = model_of("draft", None) if draft else None

    # Some families pad the embedding differently per size (e.g. Qwen2.5); ids past the
    # tokenizer are never produced, so both logits are cut to the common width.
    widths = [target_model.get_output_embeddings().weight.shape[0]]
    if draft_model is not None and not head:
        widths.append(draft_model.get_output_embeddings().weight.shape[0])
    vocab = min(widths)
    if vocab < len(tokenizer):
        raise IncompatiblePairError(
            f"model output width {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")

    context = getattr(target_model.config, "max_position_embeddings", None) or 2048
    if draft_model is not None and not head:  # a head's rotary positions run past its training length
        context = min(context, getattr(draft_model.config, "max_position_embeddings", context) or context)
    if max_model_len:
        context = min(context, max_model_len)
    return ModelPair(
        target=target_model, draft=draft_model, tokenizer=tokenizer, device=dev, dtype=dt,
        context_length=context, vocab_size=vocab, eos_token_ids=_eos_ids(target_model, tokenizer),
        target_name=target, draft_name=draft or "",
    )
