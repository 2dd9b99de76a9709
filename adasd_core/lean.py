"""A lean batched forward for Llama-family decoders over a pool of KV slots written by position.

It skips transformers' per-call machinery (mask building, cache objects, output classes) and runs
the loaded module's own weights op for op as transformers' Llama code does, with q/k/v and
gate/up each fused into one matmul (the fused weights share storage with the module's, so no
memory is added). A batch is ragged: sequence b appends n_b tokens at its own length; the tokens
run packed through the matmuls, and attention pads them per sequence with a mask that keeps each
query to its own slot's keys. A rejection is undone by lowering a slot's length. A model split over
GPUs by a device map runs each layer on its own card (its KV there too; the hidden state moves at the
boundaries). Architectures it does not know, and models whose weights accelerate offloads to the host
or disk, keep the transformers forward (kv_cache.HFPool).
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.nn.functional as F

from adasd_core import draft_head, paged_attention
from adasd_core.device import fold_query_groups

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# MKL's GEMM on weights packed once: at the few rows of a decode or verify step it runs at memory
# speed, where the plain call repacks the weight every time (1.4-1.8x slower at 5-16 rows, fp32)
PACK_ENV = "ADASD_MKL_PACK"
PACK_ROWS = 64  # MKL's kernel choice follows the row count given at packing; 64 serves 1-256 rows well
# the packed layout adds a fixed few MB per matrix: small matrices grow to several times their bytes (the
# default target's q/k/v, o and down projections: 4.3x, 7.2x, 3.4x) without running faster; beyond this
# growth the plain product serves (default pair: 350 MiB less resident, decode and verify steps no slower)
PACK_MAX_GROWTH = 3.0
# rope types whose cos/sin depend on the position only (not on the sequence length)
# int8 weights for a draft whose folder asks for them (config adasd_draft.int8_weights): fbgemm's
# dynamically quantised GEMM reads a quarter of fp32's bytes; the draft only proposes, so the target's
# check keeps every lossless method exact. CPU only; ADASD_INT8=0 turns it off, ADASD_INT8=call takes
# fbgemm's one activation scale per call (a row then depends on its batch mates; see Linear).
INT8_ENV = "ADASD_INT8"
# float32 products of up to F32_ROWS rows (decode and verify steps) through the CPU library's kernel
# (paged_attention.f32_matmul): it reads each weight once for all its rows at memory speed, where MKL's
# packed GEMM slows by 1.3-1.5x from 1 to 8 rows, and a row's output has the same bits at any row count
# up to F32_ROWS (MKL's change below 4 rows). Larger calls (prefill, big verify batches) keep MKL, which
# wins there. ADASD_F32_KERNEL=0 turns it off.
F32_ENV = "ADASD_F32_KERNEL"
F32_ROWS = 32
# every layer of a step in one call of the CPU library where all its products are on its kernels;
# ADASD_LEAN_STACK=0 keeps one call per op (the same bits)
STACK_ENV = "ADASD_LEAN_STACK"
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def supports(model) -> bool:
    """True when the lean path reproduces this model's forward."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES or _rope_type(cfg) not in STATIC_ROPE:
        return False
    if getattr(cfg, "hidden_act", "silu") not in ACTIVATIONS or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        return False
    # no accelerate offload: offloaded weights sit on "meta" and load in hooks, at every call
    device_map = getattr(model, "hf_device_map", None) or {}
    placed = {str(d) for d in device_map.values()}
    if any(p.device.type == "meta" for p in model.parameters()) or len(placed) > 1 and placed & {"cpu", "disk"}:
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or hasattr(layers[0].self_attn, "q_norm") or not hasattr(model.model, "rotary_emb"):
        return False
    return True


_supported: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
_models: weakref.WeakKeyDictionary[torch.nn.Module, LeanModel] = weakref.WeakKeyDictionary()


def supports_cached(model) -> bool:
    """supports(), decided once per model (it walks every parameter)."""
    if model not in _supported:
        _supported[model] = supports(model)
    return _supported[model]


def _fuse(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears over the same input; the modules are rebound to
    views of it, so the model keeps working and its memory does not grow."""
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        has_bias = [lin.bias is not None for lin in linears]
        bias = torch.cat([lin.bias for lin in linears]) if all(has_bias) else None
        start = 0
        for lin in linears:
            n = lin.weight.shape[0]
            lin.weight = torch.nn.Parameter(weight[start : start + n], requires_grad=False)
            if bias is not None:
                lin.bias = torch.nn.Parameter(bias[start : start + n], requires_grad=False)
            start += n
    if any(has_bias) and bias is None:  # some but not all have a bias: pad the missing ones with zeros
        bias = torch.cat([lin.bias if lin.bias is not None else weight.new_zeros(lin.weight.shape[0])
                          for lin in linears])
    return weight, bias


def _can_pack(weight: torch.Tensor) -> bool:
    import os

    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear") and os.environ.get(PACK_ENV, "1") != "0")


def _f32_kernel(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    import os

    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] % paged_attention.LANES == 0
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and os.environ.get(F32_ENV, "1") != "0" and paged_attention.kernel_available())


def int8_weights(model) -> bool:
    """Whether the lean forward runs this model's matmuls on int8 weights."""
    import os

    wanted = bool((getattr(model.config, "adasd_draft", None) or {}).get("int8_weights"))
    weight = model.get_output_embeddings().weight
    return (wanted and weight.device.type == "cpu" and weight.dtype == torch.float32
            and "fbgemm" in torch.backends.quantized.supported_engines and os.environ.get(INT8_ENV, "1") != "0")


def int8_per_call() -> bool:
    """ADASD_INT8=call: one activation scale per call, over the whole batch (batch-dependent)."""
    import os

    return os.environ.get(INT8_ENV, "1") == "call"


class Linear:
    """y = x W^T + b over [T, in] rows; on the CPU in float32 through MKL's packed GEMM where its
    layout does not grow the weight past PACK_MAX_GROWTH (it serves any row count), or with int8
    weights (per output row scales) through fbgemm's dynamically quantised GEMM.

    fbgemm quantises the activations with one scale per call, from the min and max of the whole
    batch, so a row's output would depend on its batch mates. Each row is therefore divided by its
    own abs-max, and an anchor row holding +1 and -1 pins the call's range to exactly [-1, 1]: the
    scale is fixed, every row is quantised on its own, the integer products are exact, and the row's
    scale (and the bias) are applied afterwards, element by element. A row's output is then bitwise
    the same in any batch, at the price of one GEMM row and a few elementwise ops per call."""

    __slots__ = ("weight", "bias", "packed", "int8", "anchor", "rows")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True,
                 int8: bool = False, per_call: bool = False):
        self.weight, self.bias, self.packed, self.int8, self.anchor = weight, bias, None, None, None
        self.rows = 0  # calls of at most this many rows run on the library's float32 kernel
        if int8:
            w = weight.detach().float()
            scale = (w.abs().amax(1).clamp_min(1e-12) / 127).double()
            with warnings.catch_warnings():  # quantised tensors are deprecated, still the int8 GEMM of torch 2.13
                warnings.simplefilter("ignore", UserWarning)
                q = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self.bias = None if bias is None else bias.detach().float()
            if per_call:
                self.int8 = torch.ops.quantized.linear_prepack(q, self.bias)
            else:
                self.int8 = torch.ops.quantized.linear_prepack(q, None)  # the bias goes on after the row scale
                assert w.shape[1] > 1, "the anchor row needs two columns"
                self.anchor = w.new_zeros(1, w.shape[1])
                self.anchor[0, 0], self.anchor[0, -1] = 1.0, -1.0
            return
        if _f32_kernel(weight, bias):
            self.rows = F32_ROWS
        if pack and _can_pack(weight):
            try:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), PACK_ROWS)
            except RuntimeError:
                packed = None
            if packed is not None and packed.numel() <= PACK_MAX_GROWTH * weight.numel():
                self.packed = packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.anchor is not None:  # activations at 7 bits (fbgemm's overflow-safe range), per row
            scale = x.abs().amax(1, keepdim=True).clamp_min_(1e-30)  # [T, 1]
            y = torch.ops.quantized.linear_dynamic(torch.cat((self.anchor, x / scale)), self.int8, True)[1:]
            return y.mul_(scale) if self.bias is None else torch.addcmul(self.bias, y, scale)
        if self.int8 is not None:  # ADASD_INT8=call: one scale for the whole batch
            return torch.ops.quantized.linear_dynamic(x, self.int8, True)
        if x.shape[0] <= self.rows and x.dtype == torch.float32 and not x.requires_grad:
            return paged_attention.f32_matmul(x, self.weight, self.bias)
        if self.packed is not None:  # one row too: 0.7x F.linear's matrix-vector product on the target's shapes
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, x.shape[0])
        return F.linear(x, self.weight, self.bias)

    def stack_product(self) -> tuple | None:
        """(kind, weight, scales, bias, n, k, most rows) for paged_attention.lean_stack, None off its kernels."""
        if self.rows == 0 or self.anchor is not None or self.int8 is not None:
            return None
        return (0, self.weight, None, self.bias, *self.weight.shape, self.rows)


class LeanModel:
    """A model's weights laid out for the lean forward, plus its rotary table (grown on demand)."""

    def __init__(self, model):
        cfg = model.config
        self.model = model
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim**-0.5
        self.act = ACTIVATIONS[getattr(cfg, "hidden_act", "silu")]
        self.eps = cfg.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.layers = []
        self.int8 = q8 = int8_weights(model)
        # int8 rows that depend on their batch mates (ADASD_INT8=call); else each row is batch-invariant,
        # and attention runs per sequence (forward)
        self.int8_per_call = per_call = q8 and int8_per_call()
        self.attend_alone = q8 and not per_call
        for layer in inner.layers[: self.n_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = Linear(*_fuse(attn.q_proj, attn.k_proj, attn.v_proj), int8=q8, per_call=per_call)
            gate_up = Linear(*_fuse(mlp.gate_proj, mlp.up_proj), int8=q8, per_call=per_call)
            o, down = (Linear(m.weight, m.bias, int8=q8, per_call=per_call) for m in (attn.o_proj, mlp.down_proj))
            ln1, ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
            self.layers.append((ln1, qkv, o, ln2, gate_up, down))
        self.vocab_size = model.lm_head.weight.shape[0]
        # a draft whose head covers a subset of the vocabulary (adasd_core.draft_head): its logits are
        # computed over those rows only and are -inf elsewhere
        self.head_tokens = draft_head.tokens_of(model)
        head = model.lm_head
        if self.head_tokens is None:
            self.head = Linear(head.weight, head.bias, int8=q8, per_call=per_call)
        else:
            self.head_tokens = self.head_tokens.to(head.weight.device)
            rows = head.weight.index_select(0, self.head_tokens)
            bias = None if head.bias is None else head.bias.index_select(0, self.head_tokens)
            self.head = Linear(rows, bias, int8=q8, per_call=per_call)
        self.dtype, self.device = self.embed.dtype, self.embed.device
        # a model split over devices: where each layer runs (its weights, and its KV in the pool)
        self.layer_devices = [layer.input_layernorm.weight.device for layer in inner.layers[: self.n_layers]]
        self.split = len({self.device, self.norm.device, self.head.weight.device, *self.layer_devices}) > 1
        self.cos = self.sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)

    def rotary(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., D] at `positions`, computed by the model's own rotary module; sin has its
        first half negated, so that rotate_half(x) * sin == x.roll(D / 2) * sin_signed."""
        if max_position >= self.cos.size(0):
            self.cos, self.sin = rotary_table(self.model.model.rotary_emb, self.embed, self.head_dim,
                                              max(max_position + 1, 2 * self.cos.size(0), 256))
        return self.cos[positions], self.sin[positions]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, weight, self.eps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] final hidden states -> [T, V] logits (-inf outside a subset head)."""
        if self.split:
            x = self.rms_norm(x.to(self.norm.device), self.norm).to(self.head.weight.device)
            out = self.head(x)
        else:
            out = self.head(self.rms_norm(x, self.norm))
        if self.head_tokens is None:
            return out
        full = out.new_full((out.shape[0], self.vocab_size), float("-inf"))
        return full.index_copy_(1, self.head_tokens, out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()  # as transformers: normalise in float32, scale in the model's dtype
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotary_table(rotary_emb, like: torch.Tensor, head_dim: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [size, D] of a rotary module for positions 0..size-1 (sin's first half negated)."""
    positions = torch.arange(size, device=like.device)[None]
    cos, sin = (t.to(like.device) for t in rotary_emb(like[:1][None], positions))
    half = head_dim // 2
    return cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)


def lean_model(model) -> LeanModel:
    lean = _models.get(model)
    if lean is None:
        lean = _models[model] = LeanModel(model)
    return lean


def _masking(starts: list[int], ns: list[int], end: int, groups: int, dev: torch.device
             ) -> tuple[torch.Tensor | None, bool, int]:
    """(mask, causal, groups) of the attention of sequences that append ns[b] tokens at starts[b],
    over keys 0..end-1."""
    if len(ns) == 1 and ns[0] == 1:
        return None, False, groups
    if len(ns) == 1 and starts[0] == 0:  # a causal mask from the kernel: flash takes grouped heads without one
        return None, True, 1
    # column j of sequence b sits at position starts[b] + j and sees keys 0..starts[b] + j
    pos_bn = torch.tensor(starts, device=dev)[:, None] + torch.arange(max(ns), device=dev)  # [B, n]
    mask = (torch.arange(end, device=dev)[None, None, :] <= pos_bn[:, :, None])[:, None]  # [B, 1, n, end]
    return (mask.repeat_interleave(groups, dim=2) if groups > 1 else mask), False, groups  # [B, 1, n G, end]


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               groups: int, scale: float) -> torch.Tensor:
    """q [B, n, H, D] over keys, values [B, H_kv, end, D] -> [B, n, H, D].

    groups > 1 folds the H / H_kv query heads of each KV head into its query rows ([B, H_kv, n G, D],
    row j G + g; the mask comes with one row per query row): plain multi-head attention, which the
    fused kernels take with a mask, where grouped heads and a mask together fall back to the math
    kernel, which repeats K / V per query head. groups == 1 passes grouped heads as they are."""
    B, n, H, D = q.shape
    Hkv = keys.size(1)
    if groups == 1:
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=Hkv != H,
        ).transpose(1, 2)
    assert not causal and groups * Hkv == H, (causal, groups, Hkv, H)
    q = q.reshape(B, n, Hkv, groups, D).transpose(1, 2).reshape(B, Hkv, n * groups, D)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # [B, H_kv, n G, D]
    return out.reshape(B, Hkv, n, groups, D).transpose(1, 2).reshape(B, n, H, D)


def _to(device: torch.device, *tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in tensors)


class Ragged:
    """A ragged batch's layout for attention over a pool of KV slots: sequence b appends ns[b] tokens to
    slot slots[b] at position starts[b]; its T = sum ns tokens run packed, and attention pads them per
    sequence with a mask that keeps each query to its own slot's keys. `owner` gives the heads and the
    rotary table (a LeanModel, or a draft head with the same attributes)."""

    def __init__(self, owner, slots: list[int], starts: list[int], ns: list[int], capacity: int,
                 alone: bool = False, paged: Paged | None = None):
        dev = owner.device
        self.paged = paged
        self.slots, self.starts, self.ns = slots, starts, ns
        self.B, self.n, self.T = len(slots), max(ns), sum(ns)
        self.ragged = self.n * self.B != self.T
        self.H, self.Hkv, self.D, self.scale = owner.n_heads, owner.n_kv, owner.head_dim, owner.scale
        start_t = torch.tensor(starts, device=dev)
        self.b_idx = torch.tensor([b for b, m in enumerate(ns) for _ in range(m)], device=dev)  # [T] its sequence
        self.j_idx = torch.tensor([j for m in ns for j in range(m)], device=dev)  # [T] its column
        self.pos = start_t[self.b_idx] + self.j_idx  # [T]
        self.end = end = max(s + m for s, m in zip(starts, ns))  # keys 0..end-1 cover every query
        assert paged is not None or end <= capacity, f"KV slot overflow: position {end} past capacity {capacity}"
        cos, sin = owner.rotary(self.pos, end)  # [T, D]
        self.cos_rows, self.sin_rows = cos, sin
        self.cos, self.sin = cos[:, None], sin[:, None]  # [T, 1, D]
        if paged is None:  # slots: written by slot and position
            self.contiguous = slots == list(range(slots[0], slots[0] + self.B))
            self.slot_idx = torch.tensor(slots, device=dev)
            self.slot_tok = self.slot_idx[self.b_idx]  # [T]
        groups = self.H // self.Hkv if self.Hkv != self.H and fold_query_groups(dev) else 1
        # int8 activations are rounded to a grid, so the last bits of a batched attention (other key
        # lengths, padded queries) can move a row's draft logits by whole grid steps: attention then runs
        # per sequence, exactly as that sequence alone would, and each row's logits are batch-invariant;
        # only where the batch holds a request whose text must repeat (`alone`): it costs the others time
        self.per_seq = self.B > 1 and alone and getattr(owner, "attend_alone", False) and \
            not getattr(owner, "split", False)
        if paged is not None:
            paged.lay_out(self, dev)
            if paged.fused:  # the kernel masks by position and reads each row's own blocks
                return
        self.mask = None
        if self.per_seq:
            self.offsets = [sum(ns[:b]) for b in range(self.B)]
            self.alone = [(_masking([s], [m], s + m, groups, dev), s + m) for s, m in zip(starts, ns)]
        else:
            self.mask, self.causal, self.groups = _masking(starts, ns, end, groups, dev)

    _MOVED = ("cos", "sin", "pos", "b_idx", "j_idx", "slot_idx", "slot_tok", "mask", "blk", "off", "table")

    def to(self, device: torch.device) -> None:
        """Move the layout to another card (a model split over devices)."""
        for name, t in zip(self._MOVED, _to(device, *(getattr(self, n, None) for n in self._MOVED))):
            setattr(self, name, t)

    def rotate(self, fused: torch.Tensor, nqk: int) -> torch.Tensor:
        """Rotary on the first nqk heads of fused [T, heads, D] (q and k at once)."""
        qk = fused[:, :nqk]
        return torch.addcmul(qk * self.cos, qk.roll(self.D // 2, -1), self.sin)

    def attend(self, fused: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """fused [T, (H + 2 H_kv) D] q, k, v rows -> attention output [T, H D]; k and v written into
        kc, vc [S, H_kv, C, D] at their positions first."""
        T, H, Hkv, D, B = self.T, self.H, self.Hkv, self.D, self.B
        nqk = H + Hkv
        if self.paged is not None and self.paged.fused:  # one kernel call
            p = self.paged
            return paged_attention.rope_write_attend(fused.contiguous(), self.cos_rows, self.sin_rows, kc, vc,
                                                     p.table32, p.seq32, p.pos32, H, self.scale)
        qk = self.rotate(fused[:, : nqk * D].view(T, nqk, D), nqk)
        q, k = qk[:, :H], qk[:, H:]
        v = fused[:, nqk * D :].view(T, Hkv, D)
        end, starts, slots = self.end, self.starts, self.slots
        if self.paged is not None:
            return self.paged.attend(self, q, k, v, kc, vc).reshape(T, H * D)
        if B == 1:
            s0 = slots[0]
            kc[s0, :, starts[0] : end] = k.transpose(0, 1)
            vc[s0, :, starts[0] : end] = v.transpose(0, 1)
        else:
            kc[self.slot_tok, :, self.pos] = k
            vc[self.slot_tok, :, self.pos] = v
        if self.per_seq:  # [T, H, D]
            attn = torch.cat([_attention(q[o : o + m][None], kc[s : s + 1, :, :e], vc[s : s + 1, :, :e], *masking,
                                         self.scale)[0]
                              for o, m, s, (masking, e) in zip(self.offsets, self.ns, slots, self.alone)])
        else:
            if self.contiguous:
                keys, values = kc[slots[0] : slots[0] + B, :, :end], vc[slots[0] : slots[0] + B, :, :end]
            else:
                keys, values = kc[self.slot_idx, :, :end], vc[self.slot_idx, :, :end]
            attn = self.batched(q, keys, values)
        return attn.reshape(T, H * D)

    def batched(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] over each sequence's keys, values [B, H_kv, end, D] -> [T, H, D] (or [B, n, H, D])."""
        B, n, H, D = self.B, self.n, self.H, self.D
        if not self.ragged:
            q = q.reshape(B, n, H, D)
        else:
            q_pad = q.new_zeros(B, n, H, D)
            q_pad[self.b_idx, self.j_idx] = q
            q = q_pad
        attn = _attention(q, keys, values, self.mask, self.causal, self.groups, self.scale)  # [B, n, H, D]
        return attn[self.b_idx, self.j_idx] if self.ragged else attn

    def last_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each sequence's last fed row of x [T, ...] -> [B, ...]."""
        if self.T == self.B:  # one row each (a decode or draft step): every row is a last one
            return x
        return x[-1:] if self.B == 1 else x[torch.tensor(self.ns, device=x.device).cumsum(0) - 1]


class Paged:
    """A batch's block tables over a paged pool (kv_cache.LeanPool): sequence b's position p lives in
    block tables[b][p // size] at offset p % size of each layer's K, V [H_kv, blocks, size, D].

    On the CPU one kernel call per layer (adasd_core.paged_attention.rope_write_attend) rotates q and k,
    writes k and v at their blocks and attends over the tables in place, row by row (batch-invariant).
    Elsewhere (a GPU, another dtype, no compiler) k and v are written through indices and attention
    reads one view of a sequence whose blocks are consecutive (one sequence running alone, as its blocks
    were taken), else each sequence's blocks gathered."""

    def __init__(self, tables: list[list[int]], size: int):
        self.tables, self.size = tables, size

    def lay_out(self, r: Ragged, dev: torch.device) -> None:
        size = self.size
        m = self.blocks = -(-r.end // size)
        rows = [t[:m] + [t[0]] * (m - len(t[:m])) for t in self.tables]  # padded with a block of its own
        G, K = r.H // r.Hkv, paged_attention
        self.fused = (dev.type == "cpu" and r.cos_rows.dtype == torch.float32 and r.D % K.LANES == 0
                      and G <= K.MAX_G and G * r.D <= K.MAX_GD and K.kernel_available())
        if self.fused:
            self.table32 = torch.tensor(rows, dtype=torch.int32, device=dev)  # [B, m]
            self.seq32, self.pos32 = r.b_idx.int(), r.pos.int()
            return
        first = self.tables[0]
        self.view = r.B == 1 and first[m - 1] - first[0] == m - 1 and all(
            b == a + 1 for a, b in zip(first[: m - 1], first[1:m]))
        r.table = r.blk = r.off = None
        if not self.view:  # written through indices, gathered to be read
            r.table = torch.tensor(rows, dtype=torch.long, device=dev)  # [B, m]
            r.blk = r.table[r.b_idx, r.pos // size]  # [T]
            r.off = r.pos % size

    def attend(self, r: Ragged, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
               vc: torch.Tensor) -> torch.Tensor:
        """k, v [T, H_kv, D] written at their positions, then q [T, H, D] over each sequence's keys."""
        Hkv, D, m, size = r.Hkv, r.D, self.blocks, self.size
        if self.view:  # one sequence over consecutive blocks: one view, no index tensors
            b0, start = self.tables[0][0], r.starts[0]
            keys = kc[:, b0 : b0 + m].view(1, Hkv, m * size, D)[:, :, : r.end]
            values = vc[:, b0 : b0 + m].view(1, Hkv, m * size, D)[:, :, : r.end]
            keys[0, :, start:] = k.transpose(0, 1)
            values[0, :, start:] = v.transpose(0, 1)
            return r.batched(q, keys, values).reshape(r.T, r.H, D)
        kc[:, r.blk, r.off] = k.transpose(0, 1)
        vc[:, r.blk, r.off] = v.transpose(0, 1)
        if r.per_seq:  # each sequence as alone: its own blocks only
            out = []
            for b, (o, n_b, (masking, e)) in enumerate(zip(r.offsets, r.ns, r.alone)):
                idx = r.table[b, : -(-e // size)]
                keys = kc[:, idx].reshape(1, Hkv, -1, D)[:, :, :e]
                values = vc[:, idx].reshape(1, Hkv, -1, D)[:, :, :e]
                out.append(_attention(q[o : o + n_b][None], keys, values, *masking, r.scale)[0])
            return torch.cat(out)
        keys = kc[:, r.table].transpose(0, 1).reshape(r.B, Hkv, m * size, D)[:, :, : r.end]
        values = vc[:, r.table].transpose(0, 1).reshape(r.B, Hkv, m * size, D)[:, :, : r.end]
        return r.batched(q, keys, values).reshape(r.T, r.H, D)


def forward(
    lean: LeanModel,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: list[int],
    starts: list[int],
    feeds: list[list[int]],
    all_logits: bool,
    capture: tuple[int, ...] = (),
    alone: bool = False,
    paged: Paged | None = None,
    want_logits: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """Append feeds[b] to slot slots[b] at position starts[b]; k_pool, v_pool [L, S, H_kv, C, D] (or a
    list of L [S, H_kv, C, D], each on its layer's device, for a model split over devices).

    Returns logits [B, V] at each sequence's last fed token, or [T = sum n_b, V] at every fed
    token (sequence-major) when all_logits. The T tokens run packed through every matmul; only
    attention pads them to [B, n_max] (with a mask), so ragged drafts cost no padded matmul rows.
    `capture`: layer ids whose inputs (the residual stream before them) come back too, concatenated in
    that order at every fed token, [T, len(capture) C] on the embedding's device: (logits, hidden) (EAGLE-3
    heads; id L, the number of layers, is the last layer's output). `alone`: an int8 model's rows are
    bitwise what each sequence gets alone (attention per sequence; Ragged). `want_logits` False: a
    prefill's chunk, whose logits nobody reads: None in their place, and no LM head.
    """
    ns = [len(f) for f in feeds]
    batch = Ragged(lean, slots, starts, ns, k_pool[0].size(-2), alone, paged)
    ids = torch.tensor([t for f in feeds for t in f], dtype=torch.long, device=lean.device)  # [T]
    x = F.embedding(ids, lean.embed)  # [T, C]
    kept = {}
    if small_ops_fused(lean, x):
        return _forward_fused(lean, batch, x, k_pool, v_pool, all_logits, capture, kept, want_logits)
    for i, (ln1, qkv, o_proj, ln2, gate_up, down) in enumerate(lean.layers):
        if lean.split and x.device != lean.layer_devices[i]:  # the next card: the hidden state and indices move
            x = x.to(lean.layer_devices[i], non_blocking=True)
            batch.to(lean.layer_devices[i])
        if i in capture:
            kept[i] = x.to(lean.device, non_blocking=True)
        x = x + o_proj(batch.attend(qkv(lean.rms_norm(x, ln1)), k_pool[i], v_pool[i]))
        gate, up = gate_up(lean.rms_norm(x, ln2)).chunk(2, dim=-1)
        x = x + down(lean.act(gate) * up)
    if lean.n_layers in capture:  # the last layer's output (before the final norm)
        kept[lean.n_layers] = x.to(lean.device, non_blocking=True)
    logits = lean.logits(x if all_logits else batch.last_rows(x)) if want_logits else None
    return (logits, torch.cat([kept[i] for i in capture], dim=-1)) if capture else logits


def small_ops_fused(lean: LeanModel, x: torch.Tensor) -> bool:
    """Whether the layers' norms, residual adds and SiLU-gated products run as one kernel call each
    (adasd_core.paged_attention's CPU library: float32 on one CPU device, SiLU MLPs)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not lean.split and lean.act is F.silu
            and lean.embed.dtype == torch.float32 and paged_attention.kernel_available())


def _stack(lean: LeanModel) -> paged_attention.Stack | None:
    """The layers as one lean_stack call reads them, None where some product is on neither of the library's
    kernels (or ADASD_LEAN_STACK=0); built once per layer list (a quantised copy has its own)."""
    cached = getattr(lean, "_stack_of", None)
    if cached is not None and cached[0] is lean.layers:
        return cached[1]
    products = [getattr(lin, "stack_product", lambda: None)()
                for _, qkv, o, _, gate_up, down in lean.layers for lin in (qkv, o, gate_up, down)]
    stack = None
    if all(products) and os.environ.get(STACK_ENV, "1") != "0":
        stack = paged_attention.Stack(products, [ln1 for ln1, *_ in lean.layers], [ly[3] for ly in lean.layers])
    lean._stack_of = (lean.layers, stack)
    return stack


def _forward_fused(lean: LeanModel, batch: Ragged, x: torch.Tensor, k_pool, v_pool, all_logits: bool,
                   capture: tuple[int, ...], kept: dict, want_logits: bool = True):
    """forward's layers with a residual add and the next norm in one call, and SiLU(gate) * up in one;
    the same arithmetic row by row, so rows stay batch-invariant. Where every product is on the library's
    kernels and the KV is paged, all the layers run in one call of the same functions (lean_stack)."""
    layers, eps, K = lean.layers, lean.eps, paged_attention
    p = batch.paged
    if p is not None and p.fused and isinstance(k_pool, torch.Tensor):
        stack = _stack(lean)
        if stack is not None and batch.T <= stack.rows:
            out = K.lean_stack(stack, x.contiguous(), k_pool, v_pool, batch.cos_rows, batch.sin_rows, p.table32,
                               p.seq32, p.pos32, lean.n_heads, lean.scale, eps, capture)
            x, hidden = out if capture else (out, None)
            logits = lean.logits(x if all_logits else batch.last_rows(x)) if want_logits else None
            return (logits, hidden) if capture else logits
    h = K.rms_norm(x, layers[0][0], eps)
    for i, (_, qkv, o_proj, ln2, gate_up, down) in enumerate(layers):
        if i in capture:
            kept[i] = x
        x, h = K.add_rms_norm(x, o_proj(batch.attend(qkv(h), k_pool[i], v_pool[i])), ln2, eps)
        y = down(K.silu_mul(gate_up(h)))
        if i + 1 < len(layers):
            x, h = K.add_rms_norm(x, y, layers[i + 1][0], eps)
        else:
            x = x + y
    if lean.n_layers in capture:
        kept[lean.n_layers] = x
    logits = lean.logits(x if all_logits else batch.last_rows(x)) if want_logits else None
    return (logits, torch.cat([kept[i] for i in capture], dim=-1)) if capture else logits
