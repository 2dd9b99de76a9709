"""KV caches as a pool of slots, one slot per running request, for one model.

A slot holds every token of its sequence but the last; a rejection is undone by cutting the slot
back to the accepted prefix, never by re-running it. `forward` appends a ragged batch of token
lists to their slots in one call.

Llama-family models run adasd_core.lean over one preallocated buffer per device (a rollback lowers a
length). Other models, and weights that accelerate offloads to the host or disk, run transformers'
forward over a DynamicCache per slot, one sequence at a time: correct, not batched.
"""

from __future__ import annotations

import inspect

import torch

from adasd_core import draft_head, lean

_CACHE_KWARG: dict[type, str] = {}


def _cache_kwarg(model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache`."""
    cls = type(model)
    if cls not in _CACHE_KWARG:
        params = inspect.signature(cls.forward).parameters
        _CACHE_KWARG[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[cls]


def _dynamic_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers < 4.56
        return DynamicCache()


@torch.inference_mode()
def hf_forward(model, ids: torch.Tensor, cache=None, logits_to_keep: int = 1):
    """transformers' forward: ids [B, n] appended to a DynamicCache (new if None) -> (logits, cache)."""
    cache = cache if cache is not None else _dynamic_cache(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=logits_to_keep, **{_cache_kwarg(model): cache})
    return out.logits, cache


class LeanPool:
    """K, V [layers, slots, H_kv, capacity, D] for the lean forward, and each slot's length. A model split
    over devices keeps each layer's K, V on its layer's device: k, v are then lists of [slots, H_kv,
    capacity, D], views of one buffer per device."""

    batched = True

    def __init__(self, model, slots: int, capacity: int):
        self.lean = model if isinstance(model, lean.LeanModel) else lean.lean_model(model)
        m = self.lean
        devices = list(dict.fromkeys(m.layer_devices))
        self.buffers = []  # (device's layers, K, V) [their count, slots, H_kv, capacity, D]
        for device in devices:
            layers = [i for i, d in enumerate(m.layer_devices) if d == device]
            shape = (len(layers), slots, m.n_kv, capacity, m.head_dim)
            self.buffers.append((layers, torch.zeros(shape, dtype=m.dtype, device=device),
                                 torch.zeros(shape, dtype=m.dtype, device=device)))
        if len(devices) == 1:
            self.k, self.v = self.buffers[0][1], self.buffers[0][2]
        else:
            self.k, self.v = [None] * m.n_layers, [None] * m.n_layers
            for layers, k, v in self.buffers:
                for j, i in enumerate(layers):
                    self.k[i], self.v[i] = k[j], v[j]
        self.lengths = [0] * slots
        self.capacity = capacity

    @torch.inference_mode()
    def forward(self, slots: list[int], feeds: list[list[int]], all_logits: bool = False,
                capture: tuple[int, ...] = (), alone: bool = False):
        """feeds[b] appended to slots[b] -> logits [B, V] at each last token, or [sum n_b, V]; with
        `capture`, (logits, the captured layers' inputs [sum n_b, ...]); `alone`: rows batch-invariant
        (lean.forward)."""
        keep = every = None
        lo, hi = min(slots), max(slots)
        if len(slots) > 1 and slots == sorted(slots) and hi - lo + 1 != len(slots) and hi - lo + 1 <= 2 * len(slots):
            # a few idle slots inside the range: run them on a dummy token (written past their valid
            # length, then dropped) rather than gather every layer's cache into a copy
            wanted = dict(zip(slots, feeds))
            slots = list(range(lo, hi + 1))
            feeds = [wanted.get(s, [0]) for s in slots]
            fed = [len(wanted[s]) if s in wanted else 0 for s in slots]
            # the rows to return: one per slot, or every fed token of the wanted slots
            keep, every, row, last = [], [], 0, 0
            for s, f in zip(slots, feeds):
                if s in wanted:
                    every.extend(range(row, row + len(f)))
                    keep.append(last)
                row += len(f)
                last += 1
            if all_logits:
                keep = every
        else:
            fed = [len(f) for f in feeds]
        starts = [self.lengths[s] for s in slots]
        out = lean.forward(self.lean, self.k, self.v, slots, starts, feeds, all_logits, capture, alone)
        for s, n in zip(slots, fed):
            self.lengths[s] += n
        if keep is None:
            return out
        if capture:
            return out[0][keep], out[1][every]
        return out[keep]

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def rollback(self, slot: int, length: int) -> None:
        assert 0 <= length <= self.lengths[slot], f"cannot roll slot {slot} of {self.lengths[slot]} forward to {length}"
        self.lengths[slot] = length

    def swap(self, a: int, b: int) -> None:
        n = max(self.lengths[a], self.lengths[b])
        for buf in (buf for _, k, v in self.buffers for buf in (k, v)):
            tmp = buf[:, a, :, :n].clone()
            buf[:, a, :, :n] = buf[:, b, :, :n]
            buf[:, b, :, :n] = tmp
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0


class SharedPool(LeanPool):
    """A self-draft's view of its target's pool (adasd_core.selfdraft): the same K, V buffers and the
    same lengths, run with the draft's weights. Its forwards write past the target's length (the
    proposer lowers it back after drafting); moving and clearing slots is the target pool's work."""

    def __init__(self, model: lean.LeanModel, target: LeanPool):
        self.lean = model
        self.buffers, self.k, self.v = target.buffers, target.k, target.v
        self.lengths, self.capacity = target.lengths, target.capacity

    def swap(self, a: int, b: int) -> None:
        pass

    def clear(self, slot: int) -> None:
        pass


class HFPool:
    """transformers' forward over one DynamicCache per slot (models the lean path does not cover)."""

    batched = False

    def __init__(self, model, slots: int, capacity: int):
        self.model = model
        self.head_tokens = draft_head.tokens_of(model)
        self.caches: list = [None] * slots
        self.capacity = capacity

    @torch.inference_mode()
    def forward(self, slots: list[int], feeds: list[list[int]], all_logits: bool = False,
                alone: bool = False) -> torch.Tensor:
        """As LeanPool.forward; every sequence runs alone already."""
        device = self.model.get_input_embeddings().weight.device
        out = []
        for s, feed in zip(slots, feeds):
            ids = torch.tensor([feed], dtype=torch.long, device=device)
            logits, self.caches[s] = hf_forward(self.model, ids, self.caches[s], 0 if all_logits else 1)
            out.append(logits[0])
        return draft_head.mask_logits(torch.cat(out), self.head_tokens)

    def length(self, slot: int) -> int:
        cache = self.caches[slot]
        return 0 if cache is None else cache.get_seq_length()

    def rollback(self, slot: int, length: int) -> None:
        extra = self.length(slot) - length
        assert extra >= 0, f"cannot roll slot {slot} of {self.length(slot)} forward to {length}"
        if extra:
            self.caches[slot].crop(-extra) if length else self.clear(slot)

    def swap(self, a: int, b: int) -> None:
        self.caches[a], self.caches[b] = self.caches[b], self.caches[a]

    def clear(self, slot: int) -> None:
        self.caches[slot] = None


def make_pool(model, slots: int, capacity: int, use_lean: bool = True):
    from adasd_core.eagle import Eagle3Head, EaglePool
    from adasd_core.selfdraft import SelfDraft

    if isinstance(model, Eagle3Head):
        return EaglePool(model, slots, capacity)
    if isinstance(model, SelfDraft):  # alone (a timing); the runner gives it the target's pool (SharedPool)
        return LeanPool(model.lean_model(), slots, capacity)
    if use_lean and lean.supports_cached(model):
        return LeanPool(model, slots, capacity)
    return HFPool(model, slots, capacity)


def _as_device(where) -> torch.device:
    """A device map's value: a GPU index, a name ("cuda:1", "cpu", "disk") or a torch.device."""
    return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)


def layer_devices(model) -> list[torch.device]:
    """The device each decoder layer runs on, so where its KV lives: its weights' device from the model's
    device map, or for a layer accelerate offloads to the host or disk, the map's first accelerator
    (where its weights are brought to run)."""
    n = model.config.num_hidden_layers
    device_map = getattr(model, "hf_device_map", None) or {}
    if len(set(map(str, device_map.values()))) <= 1:
        one = _as_device(next(iter(device_map.values()))) if device_map else next(model.parameters()).device
        return [one] * n
    layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n), None)
    if layers is None:
        raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__} to place their KV")
    names = {id(module): name for name, module in model.named_modules()}
    runs_on = [_as_device(d) for d in device_map.values() if str(d) not in ("cpu", "disk")]
    main = runs_on[0] if runs_on else torch.device("cpu")

    def placed(name: str) -> torch.device:
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        if not keys:
            return main
        where = device_map[max(keys, key=len)]
        return main if str(where) in ("cpu", "disk") else _as_device(where)

    return [placed(names[id(layer)]) for layer in layers]


def kv_bytes_per_device(model, capacity: int) -> dict[torch.device, int]:
    """KV bytes one slot of `capacity` positions takes on each device this model's layers run on (none for
    a self-draft: it writes into its target's slots)."""
    from adasd_core.selfdraft import SelfDraft

    if isinstance(model, SelfDraft):
        return {}
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    item = next(model.parameters()).element_size()
    out: dict[torch.device, int] = {}
    for device in layer_devices(model):
        out[device] = out.get(device, 0) + 2 * heads * capacity * head_dim * item
    return out


def kv_bytes_per_slot(model, capacity: int) -> int:
    """KV bytes one slot of `capacity` positions takes for this model."""
    return sum(kv_bytes_per_device(model, capacity).values())


def device_budget(device: torch.device, memory_fraction: float = 0.9) -> float:
    """Bytes the KV pool may take on `device`: on CUDA what is left of `memory_fraction` of the card after
    loading; elsewhere half the free RAM (inf where unknown)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free - (1.0 - memory_fraction) * total
    import os

    try:
        return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return float("inf")


def plan_slots(pair, max_running: int, memory_fraction: float = 0.9) -> tuple[int, int]:
    """How many KV slots fit: (slots, bytes per slot). Each device's share of a slot (the KV of the layers
    placed there, for both models) is held against that device's budget (device_budget); the tightest
    device decides. Raises ModelLoadError when not even one slot fits."""
    from adasd_core.drafting import WINDOW
    from adasd_core.errors import ModelLoadError

    capacity = pair.context_length + WINDOW + 2
    need: dict[torch.device, int] = {}
    for model in (pair.target, pair.draft):
        if model is not None:
            for device, n in kv_bytes_per_device(model, capacity).items():
                need[device] = need.get(device, 0) + n
    fits = max_running
    for device, per_slot in need.items():
        budget = device_budget(device, memory_fraction)
        if budget == float("inf"):
            continue
        if budget < per_slot:
            raise ModelLoadError(
                f"one KV slot of {pair.context_length} tokens needs {per_slot / 2**20:.0f} MiB on {device} but only "
                f"{max(budget, 0) / 2**20:.0f} MiB are left there after loading the models: lower max_model_len "
                "or raise gpu_memory_fraction, or use a larger device"
            )
        fits = min(fits, int(budget // per_slot))
    return fits, sum(need.values())
