"""EAGLE-3 draft heads: one decoder layer that drafts from the target's own hidden states.

A head reads, at each position, the inputs of three of the target's layers (low, middle, high),
fused by a linear layer `fc` into one hidden state, beside the embedding of the next token; it
predicts the token after that over its own, smaller vocabulary, mapped back to the target's. Its
first draft step of a round reads the target's states; the steps after it read the head's own
output (the state before its final norm), as it was trained to (training-time test).

The format is the one vLLM and SGLang load: a folder (or hub id) with a Llama `config.json` whose
architectures name `LlamaForCausalLMEagle3`, `draft_vocab_size`, optionally
`eagle_config.eagle_aux_hidden_state_layer_ids` (default: layers 2, L/2 and L-3 of an L-layer
target) and `target_hidden_size`; weights (safetensors or a PyTorch .bin):
  fc.weight [C, 3 C_t]; midlayer.input_layernorm / hidden_norm / post_attention_layernorm.weight;
  midlayer.self_attn.{q,k,v,o}_proj.weight (q, k, v read [normed embedding | normed hidden], 2 C);
  midlayer.mlp.{gate,up,down}_proj.weight; norm.weight; lm_head.weight [V_d, C];
  d2t [V_d] (target id = draft id + d2t[draft id]); t2d [V] (bool); embed_tokens.weight optional
  (else the target's embeddings are shared).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from adasd_core import lean
from adasd_core.kv_cache import SlotPool

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def default_aux_layers(n_layers: int) -> tuple[int, int, int]:
    """vLLM's default: a low, a middle and a high layer."""
    return (2, n_layers // 2, n_layers - 3) if n_layers > 4 else (0, n_layers // 2, n_layers - 1)


def is_eagle3_config(config) -> bool:
    archs = (config.get("architectures") if isinstance(config, dict) else getattr(config, "architectures", None))
    return any("Eagle3" in a for a in archs or [])


def is_eagle3(path: str) -> bool:
    """Whether a folder or hub id holds an EAGLE-3 head (by its config's architectures)."""
    folder = Path(path)
    if folder.is_dir():
        cfg = folder / "config.json"
        return cfg.is_file() and is_eagle3_config(json.loads(cfg.read_text()))
    try:
        from transformers import AutoConfig

        return is_eagle3_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError):
        return False


class _Attention(nn.Module):
    def __init__(self, c: int, heads: int, kv_heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(2 * c, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * c, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * c, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, c, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(c, inner, bias=False)
        self.up_proj = nn.Linear(c, inner, bias=False)
        self.down_proj = nn.Linear(inner, c, bias=False)


class _RMSNorm(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))


class _MidLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.hidden_size
        self.input_layernorm, self.hidden_norm, self.post_attention_layernorm = _RMSNorm(c), _RMSNorm(c), _RMSNorm(c)
        self.self_attn = _Attention(c, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                    bool(getattr(cfg, "attention_bias", False)))
        self.mlp = _MLP(c, cfg.intermediate_size)


class Eagle3Head(nn.Module):
    """An EAGLE-3 head's weights under the published names, and its training-time forward.

    `config` is a transformers LlamaConfig (its `head_dim` set); `embed` the target's input embeddings,
    shared (not a parameter of the head) unless the checkpoint brings its own."""

    def __init__(self, config, target_hidden: int, vocab_size: int, aux_layers: tuple[int, ...],
                 embed: torch.Tensor | None = None):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        c, dv = config.hidden_size, config.draft_vocab_size
        self.config, self.aux_layers, self.vocab_size = config, tuple(aux_layers), vocab_size
        self.fc = nn.Linear(len(aux_layers) * target_hidden, c, bias=False)
        self.midlayer = _MidLayer(config)
        self.norm = _RMSNorm(c)
        self.lm_head = nn.Linear(c, dv, bias=False)
        self.register_buffer("d2t", torch.zeros(dv, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(vocab_size, dtype=torch.bool))
        self.embed_tokens: nn.Embedding | None = None
        self.shared_embed = embed
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.eps = config.rms_norm_eps

    @property
    def embed(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.embed_tokens is not None else self.shared_embed

    def target_ids(self) -> torch.Tensor:
        """[V_d] the target id of each draft token."""
        return torch.arange(self.d2t.numel(), device=self.d2t.device) + self.d2t

    def num_parameters_own(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ training-time forward

    def _norm(self, x: torch.Tensor, w: nn.Parameter) -> torch.Tensor:
        return F.rms_norm(x, w.shape, w.to(x.dtype), self.eps)

    def train_forward(self, features: torch.Tensor, ids: torch.Tensor, steps: int
                      ) -> list[torch.Tensor]:
        """Training-time test over whole sequences: features [B, L, 3 C_t] (the target's states at
        positions 0..L-1), ids [B, L + steps] (token p + 1 goes with position p). Step s (1-based) at index i
        stands for the draft position i + s - 1: it reads the target's state (s = 1) or step s - 1's output
        at index i, and token i + s; it attends to step 1's keys at indices <= i and to steps 2..s's keys at
        index i, as drafting would. Returns each step's draft-vocabulary logits [B, L, V_d] (predicting token
        i + s + 1)."""
        cfg = self.config
        B, L, _ = features.shape
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        attn_m, mlp = self.midlayer.self_attn, self.midlayer.mlp
        hidden = self.fc(features)
        causal = torch.ones(L, L, dtype=torch.bool, device=features.device).tril()
        keys, values, out = [], [], []
        half = D // 2
        table = lean.rotary_table(self.rotary_emb, self.lm_head.weight, D, L + steps)
        for s in range(1, steps + 1):
            pos = torch.arange(L, device=features.device) + (s - 1)
            cos, sin = table[0][pos][None, :, None], table[1][pos][None, :, None]  # [1, L, 1, D]
            e = F.embedding(ids[:, s : s + L], self.embed)
            a_in = torch.cat((self._norm(e, self.midlayer.input_layernorm.weight),
                              self._norm(hidden, self.midlayer.hidden_norm.weight)), -1)
            q = attn_m.q_proj(a_in).view(B, L, H, D)
            k = attn_m.k_proj(a_in).view(B, L, Hkv, D)
            v = attn_m.v_proj(a_in).view(B, L, Hkv, D)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            keys.append(k.repeat_interleave(H // Hkv, 2))
            values.append(v.repeat_interleave(H // Hkv, 2))
            scale = D**-0.5
            # [B, H, L, L] against step 1's keys (causal), [B, H, L, s - 1] against the later steps' own keys
            first = torch.einsum("blhd,bmhd->bhlm", q, keys[0]) * scale
            first = first.masked_fill(~causal, float("-inf"))
            diag = [(q * kk).sum(-1).transpose(1, 2)[..., None] * scale for kk in keys[1:]]
            w = torch.cat([first, *diag], -1).softmax(-1)
            a = torch.einsum("bhlm,bmhd->blhd", w[..., :L], values[0])
            for r, vv in enumerate(values[1:]):
                a = a + w[..., L + r].transpose(1, 2)[..., None] * vv
            x = hidden + attn_m.o_proj(a.reshape(B, L, H * D))
            h2 = self._norm(x, self.midlayer.post_attention_layernorm.weight)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h2)) * mlp.up_proj(h2))
            out.append(self.lm_head(self._norm(x, self.norm.weight)))
            hidden = x
        return out


def _head_config(config_dict: dict, target_config):
    from transformers import LlamaConfig

    cfg = dict(config_dict)
    cfg.pop("architectures", None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version")})
    config.architectures = [ARCHITECTURE]
    config.num_hidden_layers = 1  # its KV: one layer
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    if not getattr(config, "draft_vocab_size", None):
        config.draft_vocab_size = config.vocab_size
    return config


def aux_layers_of(config, target_config) -> tuple[int, ...]:
    extra = getattr(config, "eagle_config", None) or {}
    ids = extra.get("eagle_aux_hidden_state_layer_ids") if isinstance(extra, dict) else None
    return tuple(int(i) for i in ids) if ids else default_aux_layers(target_config.num_hidden_layers)


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(folder / name))
            return torch.load(folder / name, map_location="cpu", weights_only=True)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        from safetensors.torch import load_file

        out = {}
        for part in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(folder / part)))
        return out
    raise ValueError(f"{folder} holds no {' or '.join(WEIGHT_FILES)}")


def _local_folder(path: str) -> Path:
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin"]))


def load(path: str, target, device: torch.device, dtype: torch.dtype) -> Eagle3Head:
    """An EAGLE-3 head from a folder or hub id, for `target` (a loaded Llama-family model): its shapes
    and auxiliary layers checked against the target's, its embeddings the target's unless it has its own."""
    folder = _local_folder(path)
    config = _head_config(json.loads((folder / "config.json").read_text()), target.config)
    tcfg = target.config
    target_hidden = int(getattr(config, "target_hidden_size", None) or tcfg.hidden_size)
    aux = aux_layers_of(config, tcfg)
    vocab = target.get_input_embeddings().weight.shape[0]
    if target_hidden != tcfg.hidden_size:
        raise ValueError(f"the head reads hidden states of size {target_hidden}, the target's are {tcfg.hidden_size}")
    if any(not 0 <= i < tcfg.num_hidden_layers for i in aux):
        raise ValueError(f"the head reads layers {list(aux)}; the target has {tcfg.num_hidden_layers}")
    sd = _state_dict(folder)
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    if "fc.weight" not in sd or sd["fc.weight"].shape[1] != len(aux) * target_hidden:
        shape = tuple(sd["fc.weight"].shape) if "fc.weight" in sd else None
        raise ValueError(f"fc.weight {shape} does not fuse {len(aux)} states of size {target_hidden}")
    if "lm_head.weight" in sd:
        config.draft_vocab_size = sd["lm_head.weight"].shape[0]
    head = Eagle3Head(config, target_hidden, vocab, aux)
    if "embed_tokens.weight" in sd:
        head.embed_tokens = nn.Embedding(*sd["embed_tokens.weight"].shape)
    if "t2d" in sd and sd["t2d"].numel() != vocab:
        raise ValueError(f"t2d covers {sd['t2d'].numel()} tokens; the target's vocabulary has {vocab}")
    if "d2t" not in sd:
        if config.draft_vocab_size != vocab:
            raise ValueError("a head with a reduced vocabulary needs its d2t table")
        sd["d2t"] = torch.zeros(vocab, dtype=torch.long)
    if "t2d" not in sd:
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[torch.arange(sd["d2t"].numel()) + sd["d2t"].long()] = True
        sd["t2d"] = t2d
    sd["d2t"], sd["t2d"] = sd["d2t"].long(), sd["t2d"].bool()
    missing, unexpected = head.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("rotary_emb")]
    if missing or unexpected:
        raise ValueError(f"not an EAGLE-3 head: missing {missing[:4]}, unexpected {unexpected[:4]}")
    ids = head.target_ids()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError("d2t maps draft tokens outside the target's vocabulary")
    head.to(device=device, dtype=dtype)
    head.d2t, head.t2d = head.d2t.long(), head.t2d.bool()
    head.shared_embed = target.get_input_embeddings().weight
    head.eval()
    head.requires_grad_(False)
    return head


def save(head: Eagle3Head, out: Path, dtype: torch.dtype = torch.bfloat16, extra: dict | None = None) -> None:
    """A head in the published layout (safetensors, config.json); the embeddings stay with the target."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in head.state_dict().items():
        if k.startswith("rotary_emb"):
            continue
        sd[k] = (v if k in ("d2t", "t2d") else v.to(dtype)).detach().contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = head.config.to_dict()
    cfg["architectures"] = [ARCHITECTURE]
    cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(head.aux_layers)}
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg["num_hidden_layers"] = 1
    for k in ("_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    if extra:
        cfg.update(extra)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------- inference


class _HeadLayout:
    """A head's weights laid out for the lean forward (lean.Linear; q, k, v and gate, up fused)."""

    attend_alone = False
    split = False

    def __init__(self, head: Eagle3Head):
        cfg = head.config
        m = head.midlayer
        self.head = head
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.eps = cfg.rms_norm_eps
        self.device, self.dtype = head.lm_head.weight.device, head.lm_head.weight.dtype
        self.fc = lean.Linear(head.fc.weight)
        a = m.self_attn
        qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        qkv_b = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]) if a.q_proj.bias is not None else None
        self.qkv, self.o = lean.Linear(qkv_w, qkv_b), lean.Linear(a.o_proj.weight)
        self.gate_up = lean.Linear(torch.cat([m.mlp.gate_proj.weight, m.mlp.up_proj.weight]))
        self.down = lean.Linear(m.mlp.down_proj.weight)
        self.lm_head = lean.Linear(head.lm_head.weight)
        self.ln_in, self.ln_hidden = m.input_layernorm.weight, m.hidden_norm.weight
        self.ln_post, self.norm = m.post_attention_layernorm.weight, head.norm.weight
        self.targets = head.target_ids()
        self.vocab_size = head.vocab_size
        self.cos = self.sin = torch.empty(0, self.head_dim, dtype=self.dtype, device=self.device)

    def rotary(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if max_position >= self.cos.size(0):
            self.cos, self.sin = lean.rotary_table(self.head.rotary_emb, self.head.lm_head.weight, self.head_dim,
                                                   max(max_position + 1, 2 * self.cos.size(0), 256))
        return self.cos[positions], self.sin[positions]

    def rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return lean.rms_norm(x, w, self.eps)


class EaglePool(SlotPool):
    """A head's KV slots (one layer) and each slot's length, beside the target's pool.

    A slot's positions hold what the head read there: the target's state at every position up to the
    target's accepted length (a catch-up step feeds them, `features`), then this round's own drafted
    positions (`hidden`: the head's previous output), which the runner cuts off after drafting."""

    def __init__(self, head: Eagle3Head, slots: int, capacity: int):  # SlotPool.__init__ is not called: no model
        self.head = head
        self.lean = m = _HeadLayout(head)
        shape = (1, slots, m.n_kv, capacity, m.head_dim)
        self.k = torch.zeros(shape, dtype=m.dtype, device=m.device)
        self.v = torch.zeros(shape, dtype=m.dtype, device=m.device)
        self.buffers = [([0], self.k, self.v)]  # SlotPool's layout: its length, rollback, swap and clear serve
        self.lengths = [0] * slots
        self.capacity = capacity
        self.hidden: torch.Tensor | None = None  # [B, C]: the last call's output states at each last row

    @torch.inference_mode()
    def forward(self, slots: list[int], feeds: list[list[int]], all_logits: bool = False,
                features: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """feeds[b] (the next token of each fed position) appended to slots[b], each position reading
        `features` [T, 3 C_t] (the target's states) or `hidden` [T, C] (the head's own; zeros when both
        are None: step timing) -> logits [B, V] at each last row, -inf outside the head's vocabulary
        (or [T, V] when all_logits); self.hidden [B, C] the output states there."""
        m = self.lean
        ns = [len(f) for f in feeds]
        batch = lean.Ragged(m, slots, [self.lengths[s] for s in slots], ns, self.capacity)
        ids = torch.tensor([t for f in feeds for t in f], dtype=torch.long, device=m.device)
        if features is not None:
            h = m.fc(features.to(m.dtype))
        elif hidden is not None:
            h = hidden
        else:
            h = torch.zeros(batch.T, m.head.config.hidden_size, dtype=m.dtype, device=m.device)
        e = F.embedding(ids, m.head.embed).to(m.dtype)
        a_in = torch.cat((m.rms(e, m.ln_in), m.rms(h, m.ln_hidden)), -1)
        x = h + m.o(batch.attend(m.qkv(a_in), self.k[0], self.v[0]))
        gate, up = m.gate_up(m.rms(x, m.ln_post)).chunk(2, dim=-1)
        x = x + m.down(F.silu(gate) * up)
        for s, n in zip(slots, ns):
            self.lengths[s] += n
        self.hidden = batch.last_rows(x)
        out = m.lm_head(m.rms(x if all_logits else self.hidden, m.norm))
        full = out.new_full((out.shape[0], m.vocab_size), float("-inf"))
        return full.index_copy_(1, m.targets, out)
