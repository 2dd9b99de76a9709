"""Self-drafting: the target's own weights, quantised when the pair loads, as its draft.

No file, no download, nothing in the repository: `--draft self` (or `self:int8`, `self:int4-rtn`)
makes the draft from the target's lean layout at load. The draft shares the target's KV cache: its
steps write provisional K/V at the positions they draft, in the target's own slot and past the
target's length, and the verify pass overwrites exactly those positions (it feeds the last token and
every candidate). Rollback stays lowering a length; there is no draft prefill and no second pool,
so the draft's memory is its quantised weights alone.

Precisions (CPU): `int4` (the default: the cheaper step, docs/selfdraft.md): 4-bit weights in groups
of 64 through the CPU library's product (adasd_core/paged_attention.c int4_matmul: float32 activations,
rounded to int8 per group on CPUs with AVX-512 VNNI), or torch's packed int4 kernel on bf16 activations
where the library is not built; a matrix neither can lay out (an input width no group divides) stays int8.
Its input channels are scaled by the activations of a short calibration text (AWQ-style, `layer_scales`);
`int4-rtn` rounds the weights as they are. `int8`: int8 weights with per-row scales and each activation
row quantised on its own (lean.Linear, fbgemm). The head: the full vocabulary (`full`, the default), or
the rows of a subset (adasd_core.draft_head: a folder or head_tokens.json). The draft only proposes: the
target's check keeps every lossless method exact.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from adasd_core import draft_head, lean, paged_attention
from adasd_core.device import release_freed_host_memory
from adasd_core.errors import ModelLoadError

SELF = "self"
# bumped whenever the quantiser's output changes for the same inputs (its rounding, scale search, layouts):
# statistics learned on a draft built another way must not load (warm.pair_identity reads build_id)
QUANTISER_VERSION = 3
PRECISIONS = ("int4", "int4-rtn", "int8")
INT4_GROUPS = (64, 128, 32, 256)  # the kernel's group sizes, the preferred first


def is_self(name: str | None) -> bool:
    return bool(name) and (name == SELF or name.startswith(SELF + ":"))


def parse(name: str) -> tuple[str, str | None]:
    """'self[:precision[:head]]' -> (precision, head: None for the default, 'full' or a path)."""
    parts = name.split(":", 2)
    precision = parts[1] if len(parts) > 1 and parts[1] else "int4"
    if precision not in PRECISIONS:
        raise ModelLoadError(f"self-draft precision {precision!r}: choose one of {', '.join(PRECISIONS)} "
                             f"(--draft self:int4, self:int4-rtn, self:int8)")
    return precision, (parts[2] if len(parts) > 2 and parts[2] else None)


def head_tokens(head: str | None) -> torch.Tensor | None:
    """The draft head's vocabulary subset (a folder or head_tokens.json), or None for the full head (the
    default: on SmolLM2 the full head agreed more than the shipped draft's 8,192 tokens at +0.2 ms a step)."""
    if head is None or head == "full":
        return None
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


def weight_group(k: int) -> int:
    """The int4 group size of an input width k: the CPU library's where it runs, else torch's kernel's."""
    return paged_attention.INT4_GROUP if own_int4(k) else int4_group(k)


def int4_codes(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups g [..., group] -> 4-bit codes (int32), scale and minimum [..., 1]: w ~ code * scale + min."""
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    return torch.round((g - lo) / scale).clamp_(0, 15).to(torch.int32), scale, lo


PACK_ROWS = 4096  # a multiple of paged_attention.INT4_BLOCK


class Int4Linear:
    """y = x W^T + b with W in 4 bits (groups along the input, a scale and minimum each). On the CPU library
    (paged_attention.int4_matmul: groups of 64) the activations stay float32 and nothing is converted;
    elsewhere torch's packed CPU int4 kernel runs on bf16 activations. The output is float32."""

    __slots__ = ("packed", "scales", "bias", "group", "own", "n", "k")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        w = weight.detach().float()
        n, k = w.shape
        self.n, self.k = n, k
        self.own = own_int4(k)
        self.group = group = weight_group(k)

        def codes(rows):  # a slice of rows at a time: a head's temporaries are several times its float size
            q, scale, lo = int4_codes(rows.reshape(rows.shape[0], k // group, group))
            return q.reshape(-1, k), scale[..., 0], lo[..., 0]

        chunks = range(0, n, PACK_ROWS)
        if self.own:  # blocks of 16 rows are packed alone, so slices of PACK_ROWS pack as the whole does
            parts = [paged_attention.int4_pack(*codes(w[i:i + PACK_ROWS])) for i in chunks]
            self.packed, self.scales = (torch.cat(t) for t in zip(*parts))
        else:  # torch's kernel reads w = (q - 8) * scale + zero
            q, scale, lo = (torch.cat(t) for t in zip(*(codes(w[i:i + PACK_ROWS]) for i in chunks)))
            zero = lo + 8 * scale
            self.scales = torch.stack((scale, zero), -1).transpose(0, 1).contiguous().bfloat16()
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.bias = None if bias is None else bias.detach().float()

    @property
    def weight(self) -> torch.Tensor:  # where lean reads a Linear's device
        return self.scales

    def stack_product(self) -> tuple | None:
        """(kind, codes, scales, bias, n, k, most rows) for paged_attention.lean_stack, None off its kernel."""
        return (1, self.packed, self.scales, self.bias, self.n, self.k, 1 << 30) if self.own else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.own:
            return paged_attention.int4_matmul(x, self.packed, self.scales, self.bias, self.n)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), self.packed, self.group, self.scales).float()
        return y if self.bias is None else y.add_(self.bias)


class SelfDraft:
    """pair.draft of a self-drafted target: what the engine asks of a draft (its config's settings,
    its lean layout), built from the target's own weights. `calibration`: token ids whose activations
    choose the int4 precision's per-channel scales (None: plain rounding)."""

    def __init__(self, target, precision: str = "int4", tokens: torch.Tensor | None = None,
                 calibration: list[int] | None = None):
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
        self.calibration = calibration
        # the relaxed check stays off by default, as for the shipped draft (min_posterior 1: lossless)
        self.config = SimpleNamespace(adasd_draft={"min_posterior": 1.0},
                                      max_position_embeddings=target.config.max_position_embeddings,
                                      adasd_build=self.build_id())
        self._lean: lean.LeanModel | None = None

    def build_id(self) -> dict:
        """What the draft's weights follow from besides the target: the quantiser and its settings, the head's
        rows, the calibration text, and which product runs them (the library's int4 or torch's)."""
        def digest(ids) -> str | None:
            return None if ids is None else hashlib.sha256(json.dumps([int(t) for t in ids]).encode()).hexdigest()[:16]

        return {"quantiser": QUANTISER_VERSION, "precision": self.precision, "groups": INT4_GROUPS,
                "alphas": SMOOTH_ALPHAS, "head": digest(self.tokens.tolist() if self.tokens is not None else None),
                "calibration": digest(self.calibration),
                "int4_kernel": "library" if paged_attention.kernel_available() else "torch"}

    def lean_model(self) -> lean.LeanModel:
        if self._lean is None:
            target = lean.lean_model(self.target)
            scales = layer_scales(target, self.target, self.calibration) if self.calibration else None
            self._lean = quantised(target, self.precision, self.tokens, scales)
            release_freed_host_memory()
        return self._lean


# ---------------------------------------------------------------- activation-aware scales (int4)
#
# A channel whose activations run large carries more of a product than its weights' range says, and
# rounding its weights to 4 bits costs more there. As AWQ does, each input channel j of q/k/v, gate/up
# and down is scaled by s_j = a_j^alpha (a_j: the mean |activation| on calibration text), the weights
# multiplied by s and the input divided by it, folded exactly into what feeds the product (the norm's
# weight; for down, the up rows). alpha per matrix minimises the rounded product's squared error on
# the calibration activations. o_proj and the head keep plain rounding (their scales measured no better).

SMOOTH_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CALIBRATION_TOKENS = 512


def calibration_ids(tokenizer, n: int = CALIBRATION_TOKENS) -> list[int]:
    """Token ids of generic English and code: the standard library's own documentation (pydoc's topics,
    on every Python install), else the source of a stdlib module."""
    import inspect
    import sysconfig

    topics = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if topics.is_file():
        text = topics.read_text(encoding="utf-8", errors="replace")[20000:60000]
    else:
        import argparse

        text = inspect.getsource(argparse)
    return tokenizer(text, add_special_tokens=False)["input_ids"][:n]


def rounded(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] as the int4 product sees it: 4-bit codes per group of 64 with bf16 scale and minimum."""
    n, k = w.shape
    group = weight_group(k) or k
    q, scale, lo = int4_codes(w.reshape(n, k // group, group))
    return (q.float() * scale.bfloat16().float() + lo.bfloat16().float()).reshape(n, k)


def channel_scales(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per input channel scales s [K] for W [N, K] and calibration inputs x [T, K]: of a^alpha over
    SMOOTH_ALPHAS, the one whose rounded product rounded(W s) (x / s) is nearest W x (alpha 0: s = 1)."""
    a = x.abs().mean(0).clamp_min(1e-6)
    ref = x @ w.T
    best, best_s = None, torch.ones_like(a)
    for alpha in SMOOTH_ALPHAS:
        s = a.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred on 1 in log scale
        err = ((x / s) @ rounded(w * s).T - ref).pow(2).mean().item()
        if best is None or err < best:
            best, best_s = err, s
    return best_s


def layer_scales(target: lean.LeanModel, model, ids: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Each layer's channel scales (q/k/v, gate/up, down), chosen layer by layer during one forward of
    the target over `ids`, so only one layer's activations are held at a time."""
    scales: list[tuple[torch.Tensor, ...]] = []
    inputs: dict[str, torch.Tensor] = {}
    hooks = []

    def keep(name):
        def hook(_module, args):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    def after_mlp(i):
        def hook(_module, args):
            _, qkv, _, _, gate_up, down = target.layers[i]
            s_down = channel_scales(down.weight.float(), args[0].detach().reshape(-1, args[0].shape[-1]).float())
            w_gu, _ = _up_divided(gate_up, s_down)  # gate/up's scales are chosen on what it will be
            scales.append((channel_scales(qkv.weight.float(), inputs.pop("qkv")),
                           channel_scales(w_gu, inputs.pop("gate_up")), s_down))
        return hook

    for i, layer in enumerate(model.model.layers[: target.n_layers]):
        hooks += [layer.self_attn.q_proj.register_forward_pre_hook(keep("qkv")),
                  layer.mlp.gate_proj.register_forward_pre_hook(keep("gate_up")),
                  layer.mlp.down_proj.register_forward_pre_hook(after_mlp(i))]
    try:
        with torch.no_grad():
            model.model(torch.tensor([ids], device=target.device), use_cache=False)  # no head: no [T, V] logits
    finally:
        for h in hooks:
            h.remove()
    return scales


def folded(layer: tuple, scales: tuple[torch.Tensor, ...]) -> tuple:
    """A lean layer in float with its channel scales folded in: the same function (the norms' weights and
    up rows divided by what the products' columns were multiplied by), better rounded to int4."""
    ln1, qkv, o, ln2, gate_up, down = layer
    s_qkv, s_gu, s_down = scales
    w_gu, b_gu = _up_divided(gate_up, s_down)
    with torch.no_grad():
        return (ln1 / s_qkv, lean.Linear(qkv.weight.float() * s_qkv, qkv.bias, pack=False), o,
                ln2 / s_gu, lean.Linear(w_gu * s_gu, b_gu, pack=False),
                lean.Linear(down.weight.float() * s_down, down.bias, pack=False))


def smoothed(target: lean.LeanModel, scales: list[tuple[torch.Tensor, ...]]) -> lean.LeanModel:
    """The target's lean layout with every layer folded (in float: what the int4 draft rounds)."""
    m = copy.copy(target)
    m.layers = [folded(layer, s) for layer, s in zip(target.layers, scales)]
    return m


def _up_divided(gate_up, s_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[gate; up] weight and bias with the up rows divided by down's channel scales (up feeds down, channel
    by channel)."""
    half = gate_up.weight.shape[0] // 2
    w, b = gate_up.weight.detach().float().clone(), _clone(gate_up.bias)
    w[half:] /= s_down[:, None]
    if b is not None:
        b[half:] /= s_down
    return w, b


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().clone()


def quantised(target: lean.LeanModel, precision: str, tokens: torch.Tensor | None,
              scales: list[tuple[torch.Tensor, ...]] | None = None) -> lean.LeanModel:
    """A copy of a target's lean layout with its matrices in `precision` (the norms, embeddings and
    rotary table shared; the float weights stay the target's, not copied). With `scales` each layer's
    scales are folded in and it is rounded in turn, so one layer's float copy is held at a time."""
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
    layers = target.layers if not scales else (folded(layer, s) for layer, s in zip(target.layers, scales))
    m.layers = [(ln1, q(qkv), q(o), ln2, q(gate_up), q(down)) for ln1, qkv, o, ln2, gate_up, down in layers]
    head = target.model.lm_head
    m.head_tokens = None if tokens is None else tokens.to(head.weight.device)
    rows = head.weight if tokens is None else head.weight.index_select(0, m.head_tokens)
    bias = head.bias if head.bias is None or tokens is None else head.bias.index_select(0, m.head_tokens)
    m.head = q(lean.Linear(rows, bias, pack=False))
    m.int8, m.int8_per_call = precision == "int8", False
    m.attend_alone = True  # rounded activations: per-sequence attention where a reproducible request runs
    return m


def load(name: str, target, tokenizer=None) -> SelfDraft:
    precision, head = parse(name)
    calibration = calibration_ids(tokenizer) if tokenizer is not None and precision == "int4" else None
    return SelfDraft(target, "int4" if precision == "int4-rtn" else precision, head_tokens(head),
                     calibration)

