"""Loading a target / draft pair through the real transformers path (hub id or local folder)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adasd_core.device import resolve_device, resolve_dtype
from adasd_core.errors import IncompatiblePairError

log = logging.getLogger(__name__)

DEMO = "demo"
DEMO_DIR = Path(__file__).parent / "demo" / "weights"


def resolve_model_path(name: str, role: str) -> str:
    """`demo` names the embedded pair; anything else is a hub id or a local path."""
    if name == DEMO:
        path = DEMO_DIR / role
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"the embedded demo {role} is missing at {path}: run `adasd build-demo`")
        return str(path)
    return name


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


def load_model(name: str, device: torch.device, dtype: torch.dtype, device_map: str | None, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if device_map:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if not device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_pair(
    target: str = DEMO,
    draft: str | None = DEMO,
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
    target_path = resolve_model_path(target, "target")
    draft_path = resolve_model_path(draft, "draft") if draft else None

    tokenizer = AutoTokenizer.from_pretrained(target_path, trust_remote_code=trust_remote_code)
    if draft_path:
        draft_tok = AutoTokenizer.from_pretrained(draft_path, trust_remote_code=trust_remote_code)
        check_vocabularies(tokenizer, draft_tok, target, draft)  # before loading any weights
    _fix_tokenizer(tokenizer)

    target_model = load_model(target_path, dev, dt, device_map, trust_remote_code)
    draft_model = load_model(draft_path, dev, dt, None, trust_remote_code) if draft_path else None

    # Some families pad the embedding differently per size (e.g. Qwen2.5); ids past the
    # tokenizer are never produced, so both logits are cut to the common width.
    widths = [target_model.get_output_embeddings().weight.shape[0]]
    if draft_model is not None:
        widths.append(draft_model.get_output_embeddings().weight.shape[0])
    vocab = min(widths)
    if vocab < len(tokenizer):
        raise IncompatiblePairError(f"model output width {vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")

    context = getattr(target_model.config, "max_position_embeddings", None) or 2048
    if draft_model is not None:
        context = min(context, getattr(draft_model.config, "max_position_embeddings", context) or context)
    if max_model_len:
        context = min(context, max_model_len)
    return ModelPair(
        target=target_model, draft=draft_model, tokenizer=tokenizer, device=dev, dtype=dt,
        context_length=context, vocab_size=vocab, eos_token_ids=_eos_ids(target_model, tokenizer),
        target_name=target, draft_name=draft or "",
    )
