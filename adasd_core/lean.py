"""A lean forward for Llama-family decoders over a KV buffer written by position.

It skips transformers' per-call machinery (mask building, cache objects, output classes) and
DynamicCache's concatenation of the whole cache at every step, a fixed cost that weighs most on
the small draft. It runs the loaded module's own weights op for op as transformers' Llama code
does, so the logits are the same; a rejection is undone by lowering the length.
Architectures it does not know, and models split over devices, keep the transformers forward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# rope types whose cos/sin depend on the position only (not on the sequence length)
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}

_models: "weakref.WeakKeyDictionary[torch.nn.Module, LeanModel]" = weakref.WeakKeyDictionary()


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def supports(model) -> bool:
    """True when the lean path reproduces this model's forward."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES or _rope_type(cfg) not in STATIC_ROPE:
        return False
    if getattr(cfg, "hidden_act", "silu") not in ACTIVATIONS or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        return False
    # one device and no accelerate offload (offloaded weights sit on "meta" and load in hooks)
    devices = {p.device for p in model.parameters()}
    device_map = getattr(model, "hf_device_map", None) or {}
    if len(devices) != 1 or next(iter(devices)).type == "meta" or len(set(device_map.values())) > 1:
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers or hasattr(layers[0].self_attn, "q_norm") or not hasattr(model.model, "rotary_emb"):
        return False
    return True


class LeanModel:
    """References to one model's weights, plus its rotary table (grown on demand)."""

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
        self.lm_head = model.lm_head
        self.layers = [
            (
                layer.input_layernorm.weight,
                layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
            )
            for layer in inner.layers[: self.n_layers]
        ]
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.cos = self.sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)

    def rotary(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, D] for positions start..start+n-1, computed by the model's own rotary module."""
        if start + n > self.cos.size(0):
            size = max(start + n, 2 * self.cos.size(0), 256)
            positions = torch.arange(size, device=self.device)[None]
            cos, sin = self.model.model.rotary_emb(self.embed[:1][None], positions)
            self.cos, self.sin = cos[0], sin[0]
        return self.cos[start : start + n], self.sin[start : start + n]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)


_supported: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def supports_cached(model) -> bool:
    """supports(), decided once per model (it walks every parameter; caches are made per request)."""
    if model not in _supported:
        _supported[model] = supports(model)
    return _supported[model]


def lean_model(model) -> LeanModel:
    lean = _models.get(model)
    if lean is None:
        lean = _models[model] = LeanModel(model)
    return lean


class LeanCache:
    """K and V buffers [layers, 1, H_kv, capacity, D]; the first `length` positions are valid.
    Rolling back lowers `length`; appending past the capacity doubles it."""

    def __init__(self, lean: LeanModel, capacity: int = 256):
        self.lean = lean
        self.length = 0
        self.k = self.v = None
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        lean = self.lean
        shape = (lean.n_layers, 1, lean.n_kv, capacity, lean.head_dim)
        k = torch.empty(shape, dtype=lean.dtype, device=lean.device)
        v = torch.empty(shape, dtype=lean.dtype, device=lean.device)
        if self.k is not None and self.length:
            k[:, :, :, : self.length] = self.k[:, :, :, : self.length]
            v[:, :, :, : self.length] = self.v[:, :, :, : self.length]
        self.k, self.v = k, v

    def reserve(self, n: int) -> None:
        if self.length + n > self.k.size(3):
            self._alloc(max(self.length + n, 2 * self.k.size(3)))

    def get_seq_length(self) -> int:
        return self.length


def new_cache(model) -> LeanCache:
    return LeanCache(lean_model(model))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def forward(ids: torch.Tensor, cache: LeanCache, logits_to_keep: int = 0) -> torch.Tensor:
    """ids [n] appended to the cache -> logits [n or logits_to_keep, V]."""
    lean = cache.lean
    n, start = ids.numel(), cache.length
    end = start + n
    cache.reserve(n)
    cos, sin = lean.rotary(start, n)  # [n, D]
    H, Hkv, D = lean.n_heads, lean.n_kv, lean.head_dim
    if n == 1:
        mask, causal = None, False
    elif start == 0:
        mask, causal = None, True
    else:  # query i sits at position start+i and sees keys 0..start+i
        mask, causal = torch.ones(n, end, dtype=torch.bool, device=lean.device).tril(start), False
    x = F.embedding(ids, lean.embed)[None]  # [1, n, C]
    for i, (ln1, q_proj, k_proj, v_proj, o_proj, ln2, gate, up, down) in enumerate(lean.layers):
        h = lean.rms_norm(x, ln1)
        q = F.linear(h, q_proj.weight, q_proj.bias).view(1, n, H, D).transpose(1, 2)  # [1, H, n, D]
        k = F.linear(h, k_proj.weight, k_proj.bias).view(1, n, Hkv, D).transpose(1, 2)
        v = F.linear(h, v_proj.weight, v_proj.bias).view(1, n, Hkv, D).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        cache.k[i, :, :, start:end] = k
        cache.v[i, :, :, start:end] = v
        attn = F.scaled_dot_product_attention(
            q, cache.k[i, :, :, :end], cache.v[i, :, :, :end], attn_mask=mask, is_causal=causal, scale=lean.scale,
            enable_gqa=Hkv != H,
        )  # [1, H, n, D]
        x = x + F.linear(attn.transpose(1, 2).reshape(1, n, H * D), o_proj.weight, o_proj.bias)
        h = lean.rms_norm(x, ln2)
        x = x + F.linear(lean.act(F.linear(h, gate.weight, gate.bias)) * F.linear(h, up.weight, up.bias),
                         down.weight, down.bias)
    cache.length = end
    if logits_to_keep:
        x = x[:, -logits_to_keep:]
    x = lean.rms_norm(x, lean.norm)
    return F.linear(x, lean.lm_head.weight, lean.lm_head.bias)[0]
