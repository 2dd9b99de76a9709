"""KV caches as a pool of slots, one slot per running request, for one model.

A slot holds every token of its sequence but the last; a rejection is undone by cutting the slot
back to the accepted prefix, never by re-running it. `forward` appends a ragged batch of token
lists to their slots in one call.

Llama-family models run adasd_core.lean over one preallocated buffer per device (a rollback lowers a
length). Other models, and weights that accelerate offloads to the host or disk, run transformers'
forward over a DynamicCache per slot, one sequence at a time: correct, not batched.
"""

from __future__ import annotations

import heapq
import inspect
import math
import mmap
from collections import OrderedDict

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


def _layer_buffers(m: lean.LeanModel, shape: tuple[int, ...], zeros):
    """K and V buffers of `shape` per layer, one pair per device for its layers: (buffers, k, v), where
    buffers is [(layer ids, K, V) [their count, *shape]] and k, v index by layer (the one device's
    buffers, or lists of per-layer views for a model split over devices)."""
    devices = list(dict.fromkeys(m.layer_devices))
    buffers = []
    for device in devices:
        layers = [i for i, d in enumerate(m.layer_devices) if d == device]
        full = (len(layers), *shape)
        buffers.append((layers, zeros(full, dtype=m.dtype, device=device), zeros(full, dtype=m.dtype, device=device)))
    if len(devices) == 1:
        return buffers, buffers[0][1], buffers[0][2]
    k, v = [None] * m.n_layers, [None] * m.n_layers
    for layers, kb, vb in buffers:
        for j, i in enumerate(layers):
            k[i], v[i] = kb[j], vb[j]
    return buffers, k, v


class SlotPool:
    """K, V [layers, slots, H_kv, capacity, D] for the lean forward, one whole slot per sequence, and each
    slot's length (an EAGLE-3 head's one-layer cache, the head's training; requests run on LeanPool). A
    model split over devices keeps each layer's K, V on its layer's device: k, v are then lists of [slots, H_kv,
    capacity, D], views of one buffer per device."""

    batched = True

    def __init__(self, model, slots: int, capacity: int):
        self.lean = model if isinstance(model, lean.LeanModel) else lean.lean_model(model)
        m = self.lean
        # (device's layers, K, V) [their count, slots, H_kv, capacity, D]
        self.buffers, self.k, self.v = _layer_buffers(
            m, (slots, m.n_kv, capacity, m.head_dim), torch.zeros)
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

    def commit(self, slot: int, length: int) -> None:
        pass

    def match(self, slot: int, tokens: list[int], limit: int) -> int:
        return 0  # whole slots: no prefix cache

    def needed(self, slot: int, length: int) -> int:
        return 0  # reserved at the start


def _zeros(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on the CPU over an anonymous memory map, whose pages the kernel zero-fills on first touch
    (torch.zeros would write, and so make resident, every page at once)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(n, 1))
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape)  # the tensor keeps buf alive


class OutOfBlocks(RuntimeError):
    """A pool has no free block left (the scheduler preempts before this can happen)."""


class Blocks:
    """The block tables of one pool: `size` positions per block, a table of block ids per slot, the
    free blocks, and with `prefix_caching` the content-addressed blocks a later sequence may reuse.

    A full block that holds final tokens (a prompt's, or those of a sequence that ended) is keyed by
    its tokens and its parent block's key, as vLLM's automatic prefix caching: a sequence that starts
    with the same tokens takes those blocks (counted references) and skips their prefill. A keyed
    block no sequence holds stays readable until it is needed: new blocks come from the never-keyed
    free ones first (lowest id, so memory that was never written stays untouched), then from the
    least recently released keyed ones."""

    def __init__(self, n_blocks: int, size: int, slots: int, prefix_caching: bool = True):
        self.n_blocks, self.size, self.prefix_caching = n_blocks, size, prefix_caching
        self.tables: list[list[int]] = [[] for _ in range(slots)]
        self.tokens: list[list[int]] = [[] for _ in range(slots)]  # what each slot's positions hold
        self.keys: list[list] = [[] for _ in range(slots)]  # keys of each slot's leading final blocks
        self.free = list(range(n_blocks))  # a heap
        self.refs = [0] * n_blocks
        self.key_of: list = [None] * n_blocks
        self.cached: dict = {}  # key -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # keyed blocks no slot holds, oldest first
        self.queries = self.hits = 0  # prompt tokens looked up, found
        self.copy = None  # (src, dst) -> None: the pool copies a block's K, V (copy on write)

    @property
    def available(self) -> int:
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        return self.n_blocks - self.available

    def needed(self, slot: int, length: int) -> int:
        """Blocks `slot` must still take to hold `length` positions."""
        return max(0, -(-length // self.size) - len(self.tables[slot]))

    def _take(self) -> int:
        if self.free:
            block = heapq.heappop(self.free)
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.cached[self.key_of[block]]
            self.key_of[block] = None
        else:
            raise OutOfBlocks(f"all {self.n_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def _put(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if self.key_of[block] is not None:
                self.idle[block] = None
            else:
                heapq.heappush(self.free, block)

    def grow(self, slot: int, tokens: list[int]) -> None:
        """Blocks for `tokens` appended to the slot."""
        table, held = self.tables[slot], self.tokens[slot]
        if held and len(held) % self.size and len(held) // self.size < len(self.keys[slot]):
            raise AssertionError("a keyed block is never written")  # truncate() un-keys the block it cuts into
        held.extend(tokens)
        while len(table) * self.size < len(held):
            table.append(self._take())

    def truncate(self, slot: int, length: int) -> None:
        """Keep the slot's first `length` positions; whole blocks past them go back."""
        table, size = self.tables[slot], self.size
        keep = -(-length // size)
        while len(table) > keep:
            self._put(table.pop())
        del self.tokens[slot][length:]
        keys = self.keys[slot]
        if len(keys) * size > length:  # cut into a keyed block: it will be written again
            i = length // size
            del keys[i:]
            if i < len(table):
                block = table[i]
                if self.refs[block] > 1:  # another sequence reads it: this one writes a copy
                    new = self._take()
                    self.copy(block, new)
                    self.refs[block] -= 1
                    table[i] = new
                elif self.key_of[block] is not None and self.cached.get(self.key_of[block]) == block:
                    del self.cached[self.key_of[block]]
                    self.key_of[block] = None

    def _key(self, slot: int, i: int):
        parent = self.keys[slot][i - 1] if i else None
        return (hash(parent), tuple(self.tokens[slot][i * self.size : (i + 1) * self.size]))

    def commit(self, slot: int, length: int) -> None:
        """The slot's first `length` positions are final: key its full blocks among them."""
        if not self.prefix_caching:
            return
        keys, table = self.keys[slot], self.tables[slot]
        for i in range(len(keys), min(length, len(self.tokens[slot])) // self.size):
            key = self._key(slot, i)
            keys.append(key)
            if key not in self.cached and self.key_of[table[i]] is None:
                self.cached[key], self.key_of[table[i]] = table[i], key

    def match(self, slot: int, tokens: list[int], limit: int) -> int:
        """Attach the cached blocks that hold the longest prefix of `tokens` (at most `limit` positions)
        to an empty slot: the positions found."""
        assert not self.tables[slot], "a prefix goes into an empty slot"
        if not self.prefix_caching:
            return 0
        self.queries += limit
        keys, table, held = self.keys[slot], self.tables[slot], self.tokens[slot]
        for i in range(limit // self.size):
            held.extend(tokens[i * self.size : (i + 1) * self.size])
            key = self._key(slot, i)
            block = self.cached.get(key)
            if block is None:
                del held[i * self.size :]
                break
            if self.refs[block] == 0:
                del self.idle[block]
            self.refs[block] += 1
            keys.append(key)
            table.append(block)
        self.hits += len(held)
        return len(held)

    def release(self, slot: int) -> None:
        """The slot's sequence ended (or was preempted): its final blocks stay cached, all go back."""
        self.commit(slot, len(self.tokens[slot]))
        self.truncate_all(slot)

    def truncate_all(self, slot: int) -> None:
        for block in reversed(self.tables[slot]):
            self._put(block)
        self.tables[slot], self.tokens[slot], self.keys[slot] = [], [], []

    def swap(self, a: int, b: int) -> None:
        for lists in (self.tables, self.tokens, self.keys):
            lists[a], lists[b] = lists[b], lists[a]


class LeanPool:
    """The lean forward's paged KV cache: K, V [layers, H_kv, blocks, block size, D] per device, a block
    table per slot (Blocks), and each slot's length. A slot costs nothing until its sequence writes:
    blocks are taken as positions are written and go back when a rollback or the sequence's end frees
    them. A model split over devices keeps each layer's blocks on its layer's device (k, v: lists of
    [H_kv, blocks, block size, D]).

    On the CPU the buffers are anonymous memory maps (_zeros): pages become resident as blocks are first
    written, so memory no block has used costs nothing."""

    batched = True

    def __init__(self, model, slots: int, capacity: int, blocks: int | None = None, block_size: int = 16,
                 prefix_caching: bool = True):
        self.lean = model if isinstance(model, lean.LeanModel) else lean.lean_model(model)
        m = self.lean
        blocks = blocks if blocks is not None else slots * -(-capacity // block_size)
        # (device's layers, K, V) [their count, H_kv, blocks, block size, D]
        self.buffers, self.k, self.v = _layer_buffers(
            m, (m.n_kv, blocks, block_size, m.head_dim), _zeros)
        self.blocks = Blocks(blocks, block_size, slots, prefix_caching)
        self.blocks.copy = self._copy_block
        self.lengths = [0] * slots
        self.capacity = capacity  # positions one sequence may hold

    def _copy_block(self, src: int, dst: int) -> None:
        for _, k, v in self.buffers:
            k[:, :, dst] = k[:, :, src]
            v[:, :, dst] = v[:, :, src]

    @torch.inference_mode()
    def forward(self, slots: list[int], feeds: list[list[int]], all_logits: bool = False,
                capture: tuple[int, ...] = (), alone: bool = False, want_logits: bool = True):
        """feeds[b] appended to slots[b] -> logits [B, V] at each last token, or [sum n_b, V]; with
        `capture`, (logits, the captured layers' inputs [sum n_b, ...]); `alone`: rows batch-invariant;
        `want_logits` False: None for the logits (lean.forward)."""
        blocks = self.blocks
        starts = [self.lengths[s] for s in slots]
        for s, start, feed in zip(slots, starts, feeds):
            if start + len(feed) > self.capacity:
                raise AssertionError(f"KV slot overflow: position {start + len(feed)} past capacity {self.capacity}")
            blocks.grow(s, feed)
        paged = lean.Paged([blocks.tables[s] for s in slots], blocks.size)
        out = lean.forward(self.lean, self.k, self.v, slots, starts, feeds, all_logits, capture, alone, paged,
                           want_logits=want_logits)
        for s, feed in zip(slots, feeds):
            self.lengths[s] += len(feed)
        return out

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def rollback(self, slot: int, length: int) -> None:
        assert 0 <= length <= self.lengths[slot], f"cannot roll slot {slot} of {self.lengths[slot]} forward to {length}"
        self.lengths[slot] = length
        self.blocks.truncate(slot, length)

    def commit(self, slot: int, length: int) -> None:
        """The slot's first `length` positions are final (a prompt's): later sequences may reuse them."""
        self.blocks.commit(slot, min(length, self.lengths[slot]))

    def match(self, slot: int, tokens: list[int], limit: int) -> int:
        """Reuse the cached prefix of `tokens` (at most `limit` positions) in an empty slot: its length."""
        self.lengths[slot] = self.blocks.match(slot, tokens, limit)
        return self.lengths[slot]

    def needed(self, slot: int, length: int) -> int:
        return self.blocks.needed(slot, length)

    def swap(self, a: int, b: int) -> None:
        self.blocks.swap(a, b)
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def clear(self, slot: int) -> None:
        self.blocks.truncate(slot, self.lengths[slot])
        self.blocks.release(slot)
        self.lengths[slot] = 0

    def kv(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the slot's K, V [layers, H_kv, length, D] (tests, tools)."""
        n, table = self.lengths[slot], self.blocks.tables[slot]
        idx = torch.tensor(table, dtype=torch.long)

        def read(bufs) -> torch.Tensor:
            parts = [buf[:, :, idx.to(buf.device)].flatten(2, 3)[:, :, :n].to(self.lean.device) for buf in bufs]
            return torch.cat(parts)

        return read([k for _, k, _ in self.buffers]), read([v for _, _, v in self.buffers])


class SharedPool(LeanPool):
    """A self-draft's view of its target's pool (adasd_core.selfdraft): the same K, V buffers, block tables
    and lengths, run with the draft's weights. Its forwards write past the target's length (the proposer
    lowers it back after drafting); moving and clearing slots is the target pool's work."""

    def __init__(self, model: lean.LeanModel, target: LeanPool):
        self.lean = model
        self.buffers, self.k, self.v, self.blocks = target.buffers, target.k, target.v, target.blocks
        self.lengths, self.capacity = target.lengths, target.capacity

    def swap(self, a: int, b: int) -> None:
        pass

    def clear(self, slot: int) -> None:
        pass

    def commit(self, slot: int, length: int) -> None:
        pass

    def match(self, slot: int, tokens: list[int], limit: int) -> int:
        return self.lengths[slot]


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
                alone: bool = False, want_logits: bool = True) -> torch.Tensor:
        """As LeanPool.forward; every sequence runs alone already (and its logits come back whatever
        `want_logits` says: the model computes them anyway)."""
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

    def commit(self, slot: int, length: int) -> None:
        pass

    def match(self, slot: int, tokens: list[int], limit: int) -> int:
        return 0  # no blocks: no prefix cache

    def needed(self, slot: int, length: int) -> int:
        return 0  # a DynamicCache grows as it needs


def make_pool(model, slots: int, capacity: int, use_lean: bool = True, blocks: int | None = None,
              block_size: int = 16, prefix_caching: bool = True):
    """A model's KV pool: `blocks` of `block_size` positions for the lean forward (None: as many as `slots`
    sequences of `capacity` positions need), an EAGLE-3 head's one-layer slots, or transformers' caches."""
    from adasd_core.eagle import Eagle3Head, EaglePool
    from adasd_core.selfdraft import SelfDraft

    if isinstance(model, Eagle3Head):
        return EaglePool(model, slots, capacity)
    paging = {"blocks": blocks, "block_size": block_size, "prefix_caching": prefix_caching}
    if isinstance(model, SelfDraft):  # alone (a timing); the runner gives it the target's pool (SharedPool)
        return LeanPool(model.lean_model(), slots, capacity, **paging)
    if use_lean and lean.supports_cached(model):
        return LeanPool(model, slots, capacity, **paging)
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


def plan_blocks(pair, max_running: int, block_size: int = 16, memory_fraction: float = 0.9) -> tuple[int, int]:
    """How many KV blocks of `block_size` positions each pool gets: (blocks, bytes per block of both
    pools). At most what `max_running` full-length sequences take; each device's share of a block (the
    KV of the layers placed there, for both models) is held against that device's budget
    (device_budget), and the tightest device decides. Raises ModelLoadError when not even one
    full-length sequence fits."""
    from adasd_core.drafting import WINDOW
    from adasd_core.errors import ModelLoadError

    per_seq = -(-(pair.context_length + WINDOW + 2) // block_size)
    need: dict[torch.device, int] = {}
    for model in (pair.target, pair.draft):
        if model is not None:
            for device, n in kv_bytes_per_device(model, block_size).items():
                need[device] = need.get(device, 0) + n
    fits = max_running * per_seq
    for device, per_block in need.items():
        budget = device_budget(device, memory_fraction)
        if budget == float("inf"):
            continue
        if budget < per_block * per_seq:
            raise ModelLoadError(
                f"one sequence of {pair.context_length} tokens needs {per_block * per_seq / 2**20:.0f} MiB of KV on "
                f"{device} but only {max(budget, 0) / 2**20:.0f} MiB are left there after loading the models: lower "
                "max_model_len or raise gpu_memory_fraction, or use a larger device"
            )
        fits = min(fits, int(budget // per_block))
    return fits, sum(need.values())
