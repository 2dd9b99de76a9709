"""Self-drafting: the target's own weights, quantised when the pair loads, as its draft.

No file, no download, nothing in the repository: `--draft self` (or `self:int8`, `self:int4:full`)
makes the draft from the target's lean layout at load. The draft shares the target's KV cache: its
steps write provisional K/V at the positions they draft, in the target's own slot and past the
target's length, and the verify pass overwrites exactly those positions (it feeds the last token and
every candidate). Rollback stays lowering a length; there is no draft prefill and no second pool,
so the draft's memory is its quantised weights alone.

Precisions (CPU): `int4` (the default: the cheaper step, docs/selfdraft.md): 4-bit weights in groups
of 64 through the CPU library's product (adasd_core/paged_attention.c int4_matmul: float32 activations,
rounded to int8 per group on CPUs with AVX-512 VNNI), or torch's packed int4 kernel on bf16 activations
where the library is not built; a matrix neither can lay out (an input width no group divides) stays int8;
`int8`: int8 weights with per-row scales and each activation row quantised on its own (lean.Linear,
fbgemm). The head: the rows of a subset of the vocabulary (adasd_core.draft_head), by default the
shipped draft's 8,192 tokens for the SmolLM2 target and the full vocabulary for any other; `full` or
a folder / head_tokens.json to choose. The draft only proposes: the target's check keeps every
lossless method exact.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import torch

from adasd_core import draft_head, lean, paged_attention
from adasd_core.errors import ModelLoadError

SELF = "self"
PRECISIONS = ("int4", "int8")
INT4_GROUPS = (64, 128, 32, 256)  # the kernel's group sizes, the preferred first


def is_self(name: str | None) -> bool:
    return bool(name) and (name == SELF or name.startswith(SELF + ":"))


def parse(name: str) -> tuple[str, str | None]:
    """'self[:precision[:head]]' -> (precision, head: None for the default, 'full' or a path)."""
    parts = name.split(":", 2)
    precision = parts[1] if len(parts) > 1 and parts[1] else "int4"
    if precision not in PRECISIONS:
        raise ModelLoadError(f"self-draft precision {precision!r}: choose one of {', '.join(PRECISIONS)} "
                             f"(--draft self:int4, self:int8)")
    return precision, (parts[2] if len(parts) > 2 and parts[2] else None)


def head_tokens(head: str | None, target_name: str) -> torch.Tensor | None:
    """The draft head's vocabulary subset, or None for the full head."""
    if head == "full":
        return None
    if head is None:
        from adasd_core.model_files import SMOLLM2

        if target_name != SMOLLM2:
            return None
        head = str(Path(__file__).parent / "smollm2_draft")
    path = Path(head).expanduser()
    folder = path.parent if path.name == draft_head.HEAD_FILE else path
    tokens = draft_head.load(folder)
    if tokens is None:
        raise ModelLoadError(f"self-draft head {head!r}: no {draft_head.HEAD_FILE} there (or pass 'full')")
    return tokens


def int4_group(k: int) -> int | None:
    return next((g for g in INT4_GROUPS if k % g == 0), None)


def own_int4(k: int) -> bool:
    """Whether an input width k takes the CPU library's int4 product (else torch's packed kernel)."""
    return k % paged_attention.INT4_GROUP == 0 and paged_attention.kernel_available()


def int4_codes(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups g [..., group] -> 4-bit codes (int32), scale and minimum [..., 1]: w ~ code * scale + min."""
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    return torch.round((g - lo) / scale).clamp_(0, 15).to(torch.int32), scale, lo


class Int4Linear:
    """y = x W^T + b with W in 4 bits (groups along the input, a scale and minimum each). On the CPU library
    (paged_attention.int4_matmul: groups of 64) the activations stay float32 and nothing is converted;
    elsewhere torch's packed CPU int4 kernel runs on bf16 activations. The output is float32."""

    __slots__ = ("packed", "scales", "bias", "group", "own", "n")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        w = weight.detach().float()
        n, k = w.shape
        self.n = n
        self.own = own_int4(k)
        self.group = group = paged_attention.INT4_GROUP if self.own else int4_group(k)
        q, scale, lo = int4_codes(w.reshape(n, k // group, group))
        q = q.reshape(n, k)
        if self.own:
            self.packed, self.scales = paged_attention.int4_pack(q, scale[..., 0], lo[..., 0])
        else:  # torch's kernel reads w = (q - 8) * scale + zero
            zero = lo + 8 * scale
            self.scales = torch.stack((scale[..., 0], zero[..., 0]), -1).transpose(0, 1).contiguous().bfloat16()
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.bias = None if bias is None else bias.detach().float()

    @property
    def weight(self) -> torch.Tensor:  # where lean reads a Linear's device
        return self.scales

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.own:
            return paged_attention.int4_matmul(x, self.packed, self.scales, self.bias, self.n)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, self.group, self.scales).float()
        return y if self.bias is None else y.add_(self.bias)


class SelfDraft:
    """pair.draft of a self-drafted target: what the engine asks of a draft (its config's settings,
    its lean layout), built from the target's own weights."""

    def __init__(self, target, precision: str = "int4", tokens: torch.Tensor | None = None):
        if not lean.supports_cached(target):
            raise ModelLoadError("self-drafting needs a Llama-family target that runs on the lean forward "
                                 f"({', '.join(lean.SUPPORTED_TYPES)} on one device); this target does not")
        weight = target.get_output_embeddings().weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise ModelLoadError("self-drafting quantises a float32 target on the CPU; on "
                                 f"{weight.device.type} / {weight.dtype} use a draft model or an EAGLE-3 head")
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise ModelLoadError("self-drafting needs torch's fbgemm engine (int8 weights) on this CPU")
        if tokens is not None and int(tokens.max()) >= weight.shape[0]:
            raise ModelLoadError(f"self-draft head token {int(tokens.max())} is past the target's vocabulary")
        self.target, self.precision, self.tokens = target, precision, tokens
        # the relaxed check stays off by default, as for the shipped draft (min_posterior 1: lossless)
        self.config = SimpleNamespace(adasd_draft={"min_posterior": 1.0},
                                      max_position_embeddings=target.config.max_position_embeddings)
        self._lean: lean.LeanModel | None = None

    def lean_model(self) -> lean.LeanModel:
        if self._lean is None:
            self._lean = quantised(lean.lean_model(self.target), self.precision, self.tokens)
        return self._lean


def quantised(target: lean.LeanModel, precision: str, tokens: torch.Tensor | None) -> lean.LeanModel:
    """A copy of a target's lean layout with its matrices in `precision` (the norms, embeddings and
    rotary table shared; the float weights stay the target's, not copied)."""
    if precision == "int8":
        def q(lin):
            return lean.Linear(lin.weight, lin.bias, int8=True)
    else:
        def q(lin):
            n, k = lin.weight.shape
            if not own_int4(k) and (n % 16 or int4_group(k) is None):  # torch's kernel's layout
                return lean.Linear(lin.weight, lin.bias, int8=True)
            return Int4Linear(lin.weight, lin.bias)
    m = copy.copy(target)
    m.layers = [(ln1, q(qkv), q(o), ln2, q(gate_up), q(down)) for ln1, qkv, o, ln2, gate_up, down in target.layers]
    head = target.model.lm_head
    m.head_tokens = None if tokens is None else tokens.to(head.weight.device)
    rows = head.weight if tokens is None else head.weight.index_select(0, m.head_tokens)
    bias = head.bias if head.bias is None or tokens is None else head.bias.index_select(0, m.head_tokens)
    m.head = q(lean.Linear(rows, bias, pack=False))
    m.int8, m.int8_per_call = precision == "int8", False
    m.attend_alone = True  # rounded activations: per-sequence attention where a reproducible request runs
    return m


def load(name: str, target, target_name: str) -> SelfDraft:
    precision, head = parse(name)
    return SelfDraft(target, precision, head_tokens(head, target_name))

