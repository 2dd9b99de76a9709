"""Attention over a paged KV cache, reading the blocks where they lie.

One layer's pool is K, V [H_kv, NB, bs, D]: key position p of sequence b sits in block tables[b, p // bs]
at offset p % bs. The batch's T query rows run packed (sequence-major); row t belongs to sequence
q_seq[t], sits at position q_pos[t] and sees keys 0..q_pos[t] of its sequence (its own key is already
in the pool). Query head h reads KV head h // (H / H_kv).

On the CPU (float32) a small C kernel, paged_attention.c, does the work: compiled at first use with
$CC (default gcc, -O3 -march=native) into $XDG_CACHE_HOME/adasd/kernels (default ~/.cache), keyed by
a hash of the source, the compiler and the CPU's flags, and loaded through ctypes. It links against
the OpenMP runtime torch has already loaded, so the process keeps one thread pool (a second runtime
next to torch's oversubscribes the cores), and runs torch.get_num_threads() threads. Each row's
output depends on that row alone: the same bits alone or in any batch.

Elsewhere (CUDA, other dtypes, no compiler) `paged_attention_torch` gathers each sequence's blocks and
runs scaled_dot_product_attention with a mask: correct, but it copies the keys and is not bitwise
batch-invariant. The GPU path that reads blocks in place is a block-table attention (FlashAttention's
flash_attn_with_kvcache(block_table=...) or FlashInfer's paged kernels); it is not built here.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = ["-O3", "-march=native", "-fPIC", "-fopenmp-simd"]
MAX_GD, MAX_G = 1024, 16  # the kernel's per-row accumulators: (H / H_kv) * D floats, H / H_kv heads
LANES = 16  # D must be a multiple

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
compile_seconds: float | None = None  # the last build's time, None when loaded from the disk cache


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                    q_seq: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D] over the pool k_cache, v_cache [H_kv, NB, bs, D] (a layer's view of a bigger buffer is
    fine: [bs, D] must be contiguous), tables int32 [B, m] (padded with any valid block id), q_seq, q_pos
    int32 [T] -> softmax(q k^T scale) v [T, H, D], causal by position."""
    T, H, D = q.shape
    Hkv, NB, bs, Dk = k_cache.shape
    assert v_cache.shape == k_cache.shape and Dk == D and H % Hkv == 0, (q.shape, k_cache.shape, v_cache.shape)
    assert tables.dim() == 2 and q_seq.shape == q_pos.shape == (T,), (tables.shape, q_seq.shape, q_pos.shape)
    if not fits(q, k_cache, v_cache) or (lib := _library()) is None:
        return paged_attention_torch(q, k_cache, v_cache, tables, q_seq, q_pos, scale)
    q = q.contiguous()
    tables, q_seq, q_pos = (t.to(torch.int32).contiguous() for t in (tables, q_seq, q_pos))
    out = torch.empty_like(q)
    rc = lib.paged_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                             q_seq.data_ptr(), q_pos.data_ptr(), out.data_ptr(), T, H, Hkv, D, tables.size(0),
                             tables.size(1), NB, bs, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                             v_cache.stride(1), scale, torch.get_num_threads())
    if rc == -1:
        raise IndexError(f"paged_attention: a block id past the pool's {NB} blocks, a sequence past the table's "
                         f"{tables.size(0)} rows, or a position past its {tables.size(1) * bs} keys")
    assert rc == 0, rc
    return out


def rope_write_attend(fused: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, tables: torch.Tensor, q_seq: torch.Tensor, q_pos: torch.Tensor,
                      H: int, scale: float) -> torch.Tensor:
    """One layer's attention from its fused projection on the CPU kernel: fused [T, (H + 2 H_kv) D] q, k, v
    rows (contiguous), rotary cos, sin [T, D] at each row's position (x cos + roll(x, D / 2) sin on q and
    k), k and v written into the pool at q_pos, then paged_attention -> [T, H D]. Tables, q_seq, q_pos
    int32 contiguous; the caller has checked `fits` (and that the library loaded)."""
    T = fused.size(0)
    Hkv, NB, bs, D = k_cache.shape
    qbuf = fused.new_empty(T, H, D)
    out = fused.new_empty(T, H * D)
    rc = _lib.rope_write_attend(fused.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
                                v_cache.data_ptr(), tables.data_ptr(), q_seq.data_ptr(), q_pos.data_ptr(),
                                qbuf.data_ptr(), out.data_ptr(), T, H, Hkv, D, tables.size(0), tables.size(1), NB,
                                bs, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                                scale, torch.get_num_threads())
    if rc == -1:
        raise IndexError(f"rope_write_attend: a block id past the pool's {NB} blocks, a sequence past the table's "
                         f"{tables.size(0)} rows, or a position past its {tables.size(1) * bs} keys")
    assert rc == 0, rc
    return out


# The lean forward's per-row small ops on the same library (float32, contiguous rows, CPU): one call each
# where torch runs several ops. The caller checks kernel_available().

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, C] / rms(x) * w."""
    out = torch.empty_like(x)
    _lib.rms_norm_rows(x.data_ptr(), w.data_ptr(), out.data_ptr(), x.size(0), x.size(1), eps)
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y) * w) for [T, C] rows: a residual add and the next norm."""
    total, out = torch.empty_like(x), torch.empty_like(x)
    _lib.add_rms_norm(x.data_ptr(), y.data_ptr(), w.data_ptr(), total.data_ptr(), out.data_ptr(), x.size(0),
                      x.size(1), eps)
    return total, out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 F] -> silu(gate) * up [T, F]."""
    assert gate_up.dtype == torch.float32 and gate_up.is_contiguous(), (gate_up.dtype, gate_up.stride())
    T, F2 = gate_up.shape
    out = gate_up.new_empty(T, F2 // 2)
    _lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), T, F2 // 2)
    return out


def takes_rows(*tensors: torch.Tensor) -> bool:
    """Whether the library's row kernels (row_argmax, js_rows, apply_bitmask_rows) take these tensors:
    2-D, contiguous float32 on the CPU, and the library built."""
    return all(t.dim() == 2 and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               for t in tensors) and kernel_available()


def row_entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs [R, V] float32 -> [R] Shannon entropy in nats, each probability clamped below at 1e-30."""
    assert probs.dtype == torch.float32 and probs.dim() == 2 and probs.is_contiguous(), (probs.dtype, probs.shape)
    out = probs.new_empty(probs.size(0))
    _lib.row_entropy(probs.data_ptr(), out.data_ptr(), probs.size(0), probs.size(1), torch.get_num_threads())
    return out


def js_rows(p: torch.Tensor, prows: torch.Tensor, q: torch.Tensor, qrows: torch.Tensor,
            hp: torch.Tensor | None = None, hq: torch.Tensor | None = None) -> torch.Tensor:
    """p, q [*, V] float32 (contiguous), row indices prows, qrows [N] -> [N] the Jensen-Shannon distance of
    each pair of rows (verification.js_distance's), in one pass over them and no [N, V] temporaries; hp, hq
    [N]: the rows' entropies where the caller has them (row_entropy's: the result is the same)."""
    assert p.dtype == q.dtype == torch.float32 and p.is_contiguous() and q.is_contiguous() and p.size(1) == q.size(1)
    prows, qrows = prows.to(torch.int64).contiguous(), qrows.to(torch.int64).contiguous()
    n = prows.numel()
    assert prows.shape == qrows.shape == (n,), (prows.shape, qrows.shape)
    h = [None if x is None else x.to(torch.float32).contiguous() for x in (hp, hq)]
    assert all(x is None or x.shape == (n,) for x in h), [None if x is None else x.shape for x in h]
    out = p.new_empty(n)
    rc = _lib.js_rows(p.data_ptr(), prows.data_ptr(), p.size(0), q.data_ptr(), qrows.data_ptr(), q.size(0),
                      *(None if x is None else x.data_ptr() for x in h), out.data_ptr(), n, p.size(1))
    if rc:
        raise IndexError(f"js_rows: a row outside p's {p.size(0)} or q's {q.size(0)} rows")
    return out


def row_argmax(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [*, V] float32 (contiguous, no NaN), row indices [N] -> [N] int64: each row's argmax (the first on
    ties), without gathering the rows."""
    assert x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2, (x.dtype, x.shape)
    rows = rows.to(torch.int64).contiguous()
    assert rows.dim() == 1, rows.shape
    out = torch.empty(rows.numel(), dtype=torch.int64)
    if _lib.row_argmax(x.data_ptr(), x.size(0), rows.data_ptr(), out.data_ptr(), rows.numel(), x.size(1)):
        raise IndexError(f"row_argmax: a row outside x's {x.size(0)} rows")
    return out


def apply_bitmask_rows(logits: torch.Tensor, rows: list[int], masks: torch.Tensor, fallback: bool) -> None:
    """In place: logits [N, V] float32 (contiguous) rows `rows` get -inf where their int32 bitmask row of
    masks [len(rows), ceil(V / 32)] forbids a token; `fallback`: a row left empty becomes uniform over its
    allowed tokens."""
    assert logits.dtype == torch.float32 and logits.is_contiguous() and masks.dtype == torch.int32
    masks = masks.contiguous()
    assert masks.shape == (len(rows), (logits.size(1) + 31) // 32), (masks.shape, logits.shape)
    assert all(0 <= r < logits.size(0) for r in rows), rows
    idx = (ctypes.c_int64 * len(rows))(*rows)
    _lib.apply_bitmask_rows(logits.data_ptr(), idx, masks.data_ptr(), len(rows), logits.size(1), int(fallback))


INT4_GROUP = 64  # int4_matmul's weights per group
INT4_BLOCK = 16  # and rows per block


def int4_pack(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_matmul's layout of codes [N, K] (0..15, w = code * scale + low per group of 64 along K) and
    scale, low [N, K / 64]: blocks of 16 rows (the last padded with zero rows), in each group of 64 eight
    64-byte vectors whose byte 4 l + e holds row l's code 8 cc + e (low nibble) and 8 cc + 4 + e (high):
    (bytes uint8 [N / 16, K / 2 * 16], scale and low as bf16 bits [N / 16, K / 64, 2, 16])."""
    N, K = codes.shape
    ng, nb = K // INT4_GROUP, -(-N // INT4_BLOCK)
    pad = nb * INT4_BLOCK - N
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, 0, 0, pad))
    c = c.reshape(nb, INT4_BLOCK, ng, INT4_GROUP // 8, 2, 4).permute(0, 2, 3, 4, 1, 5)  # [nb, ng, 8, 2, 16, 4]
    packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).reshape(nb, -1).contiguous()
    sm = torch.nn.functional.pad(torch.stack((scale, low), 0), (0, 0, 0, pad))  # [2, N + pad, ng]
    sm = sm.reshape(2, nb, INT4_BLOCK, ng).permute(1, 3, 0, 2).to(torch.bfloat16).view(torch.int16).contiguous()
    return packed, sm


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, sm: torch.Tensor, bias: torch.Tensor | None,
                N: int) -> torch.Tensor:
    """x [M, K] float32 times the int4_pack'ed W [N, K], transposed (+ bias) -> [M, N] float32."""
    x = x.contiguous()
    M, K = x.shape
    y = x.new_empty(M, N)
    rc = _lib.int4_matmul(x.data_ptr(), packed.data_ptr(), sm.data_ptr(), None if bias is None else bias.data_ptr(),
                          y.data_ptr(), M, N, K, torch.get_num_threads())
    assert rc == 0, rc
    return y


def f32_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] float32 times weight [N, K] (contiguous), transposed (+ bias) -> [M, N]: each row's output the
    same bits in any batch (paged_attention.c f32_matmul). K a multiple of 16; the caller checks."""
    x = x.contiguous()
    M, K = x.shape
    N = weight.size(0)
    y = x.new_empty(M, N)
    rc = _lib.f32_matmul(x.data_ptr(), weight.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                         M, N, K, torch.get_num_threads())
    assert rc == 0, rc
    return y


class StackLinear(ctypes.Structure):
    """lean_stack's view of one product: kind 0 a float32 weight [n, k] (f32_matmul), 1 int4_pack'ed codes
    and scales (int4_matmul)."""
    _fields_ = [("w", ctypes.c_void_p), ("sm", ctypes.c_void_p), ("b", ctypes.c_void_p), ("kind", ctypes.c_int32),
                ("n", ctypes.c_int32), ("k", ctypes.c_int32), ("pad", ctypes.c_int32)]


class Stack:
    """A model's layers as one lean_stack call reads them: per layer the fused qkv, o, fused gate_up and down
    products, given as (kind, weight or codes, scales or None, bias or None, n, k, most rows), and the two
    norms' weights. The tensors are the model's own; the caller keeps them alive (the layer list does)."""

    def __init__(self, products: list[tuple], ln1: list[torch.Tensor], ln2: list[torch.Tensor]):
        self.L = len(ln1)
        assert len(products) == 4 * self.L
        self.lin = (StackLinear * len(products))(*(
            StackLinear(w.data_ptr(), None if sm is None else sm.data_ptr(), None if b is None else b.data_ptr(),
                        kind, n, k, 0) for kind, w, sm, b, n, k, _ in products))
        self.rows = min(p[6] for p in products)  # the most rows a call takes
        ptrs = ctypes.c_void_p * self.L
        self.ln1, self.ln2 = ptrs(*(t.data_ptr() for t in ln1)), ptrs(*(t.data_ptr() for t in ln2))
        self.C = ln1[0].numel()
        self.F = products[3][5]  # down's input: the MLP's width
        self._pools: tuple | None = None
        self._keeps: dict[tuple[int, ...], tuple] = {}

    def keep(self, capture: tuple[int, ...]) -> tuple:
        """(the distinct layer ids of `capture` in order, lean_stack's keep array [L + 1]), cached per capture."""
        if capture not in self._keeps:
            ids = list(dict.fromkeys(capture))  # a layer asked for twice is kept once
            keep = (ctypes.c_int32 * (self.L + 1))(*[-1] * (self.L + 1))
            for j, i in enumerate(ids):
                keep[i] = j
            self._keeps[capture] = (ids, keep)
        return self._keeps[capture]

    def pools(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Each layer's K and V base pointers of pools [L, H_kv, NB, bs, D] (cached: the pool stays put)."""
        key = (k.data_ptr(), v.data_ptr(), k.shape, k.stride(), v.stride())
        if self._pools is None or self._pools[0] != key:
            ptrs = ctypes.c_void_p * self.L
            kp = ptrs(*(k.data_ptr() + i * k.stride(0) * k.element_size() for i in range(self.L)))
            vp = ptrs(*(v.data_ptr() + i * v.stride(0) * v.element_size() for i in range(self.L)))
            self._pools = (key, kp, vp)
        return self._pools[1], self._pools[2]


def lean_stack(stack: Stack, x: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, tables: torch.Tensor, q_seq: torch.Tensor, q_pos: torch.Tensor, H: int,
               scale: float, eps: float, capture: tuple[int, ...] = ()) -> torch.Tensor | tuple:
    """Every layer of a step in one call (paged_attention.c lean_stack): x [T, C] the embeddings (overwritten
    with the last layer's output, which comes back), pools [L, H_kv, NB, bs, D] as rope_write_attend's; with
    `capture`, (x, the inputs of those layers concatenated [T, len(capture) C]) as lean.forward returns."""
    T, C = x.shape
    L, F = stack.L, stack.F
    _, Hkv, NB, bs, D = k_pool.shape
    assert x.is_contiguous() and x.dtype == torch.float32 and C == stack.C, (x.shape, x.stride(), x.dtype)
    kp, vp = stack.pools(k_pool, v_pool)
    scratch = x.new_empty(_lib.stack_scratch(T, C, H, Hkv, D, F))
    ids, keep = stack.keep(tuple(capture))
    kept = x.new_empty(T, len(ids) * C) if capture else None
    ks, vs = k_pool.stride()[1:], v_pool.stride()[1:]
    rc = _lib.lean_stack(x.data_ptr(), scratch.data_ptr(), L, stack.lin, stack.ln1, stack.ln2, kp, vp, cos.data_ptr(),
                         sin.data_ptr(), tables.data_ptr(), q_seq.data_ptr(), q_pos.data_ptr(), keep,
                         None if kept is None else kept.data_ptr(), len(ids), T, C, H, Hkv, D, F,
                         tables.size(0), tables.size(1), NB, bs, ks[0], ks[1], vs[0], vs[1], scale, eps,
                         torch.get_num_threads())
    if rc == -1:
        raise IndexError(f"lean_stack: a block id past the pool's {NB} blocks, a sequence past the table's "
                         f"{tables.size(0)} rows, or a position past its {tables.size(1) * bs} keys")
    assert rc == 0, rc
    if len(ids) < len(capture):
        kept = kept.view(T, len(ids), C)[:, [ids.index(i) for i in capture]].reshape(T, -1)
    return (x, kept) if capture else x


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                          q_seq: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_attention by gathering the tables' blocks and one masked SDPA over the rows padded per sequence."""
    T, H, D = q.shape
    Hkv, _, bs, _ = k_cache.shape
    B, m = tables.shape
    dev = q.device
    seq, pos = q_seq.long(), q_pos.long()
    # column of each row among its sequence's rows
    order = torch.argsort(seq, stable=True)
    counts = torch.bincount(seq, minlength=B)
    col = torch.empty_like(seq)
    col[order] = torch.arange(T, device=dev) - (counts.cumsum(0) - counts)[seq[order]]
    n = int(counts.max())
    # [B, H_kv, m bs, D]; slots past a sequence's last position may hold anything (NaN), zeroed so that
    # masked keys weigh exactly 0
    end = torch.zeros(B, dtype=torch.long, device=dev).scatter_reduce(0, seq, pos + 1, "amax")
    live = (torch.arange(m * bs, device=dev) < end[:, None])[:, None, :, None]  # [B, 1, m bs, 1]
    keys, values = (torch.where(live, c[:, tables.long()].reshape(Hkv, B, m * bs, D).transpose(0, 1), 0)
                    for c in (k_cache, v_cache))
    q_pad = q.new_zeros(B, n, H, D)
    q_pad[seq, col] = q
    pos_pad = torch.zeros(B, n, dtype=torch.long, device=dev)  # padded rows see key 0: no empty softmax
    pos_pad[seq, col] = pos
    mask = torch.arange(m * bs, device=dev) <= pos_pad[..., None]  # [B, n, m bs]
    out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), keys, values, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=Hkv != H)  # [B, H, n, D]
    return out.transpose(1, 2)[seq, col]


def kernel_available() -> bool:
    """Whether the CPU kernel is built and loaded (builds it on first call)."""
    return _library() is not None


def fits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the CPU kernel takes these tensors (else paged_attention falls back to the torch path)."""
    H, D, Hkv = q.size(1), q.size(2), k_cache.size(0)
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k_cache, v_cache))
            and all(c.stride(3) == 1 and c.stride(2) == D for c in (k_cache, v_cache))
            and D % LANES == 0 and H // Hkv * D <= MAX_GD and H // Hkv <= MAX_G)


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _load(_build())
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("paged attention: no CPU kernel (%s); using the torch fallback (gathers the blocks)",
                            str(e).strip()[-2000:])
            _tried = True
    return _lib


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adasd" / "kernels"


def _openmp_runtime() -> Path | None:
    """The OpenMP runtime torch loaded (its own libgomp in a pip wheel), from this process's mappings."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    found = re.findall(r"\s(/\S*/lib(?:gomp|iomp5|omp)\b[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE)
    return Path(found[0]) if found else None


def _build() -> Path:
    """The kernel's shared library: from the disk cache, else compiled (to a temporary name, then renamed,
    so that processes starting together never load a half-written file)."""
    global compile_seconds
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler {cc!r}")
    omp = _openmp_runtime()
    compile_flags = FLAGS + (["-fopenmp"] if omp else [])  # no runtime: one thread
    # the compiler's version and what -march=native expands to on this CPU
    target = subprocess.run([cc, "-v", "-###", "-E", "-march=native", "-x", "c", os.devnull], capture_output=True,
                            text=True, timeout=60)
    if target.returncode != 0:
        raise OSError(target.stderr)
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(compile_flags).encode(), target.stderr.encode(),
                                     str(omp).encode()])).hexdigest()[:16]
    out = cache_dir() / f"paged_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "kernel.o", Path(tmp) / "kernel.so"
        link = ([str(omp), f"-Wl,-rpath,{omp.parent}"] if omp else []) + ["-lm"]
        for cmd in ([cc, *compile_flags, "-c", str(SOURCE), "-o", str(obj)],
                    [cc, "-shared", str(obj), "-o", str(lib), *link]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise OSError(f"{' '.join(cmd)}: {done.stderr}")
        os.replace(lib, out)
    compile_seconds = time.perf_counter() - start
    log.info("paged attention: compiled the CPU kernel in %.2f s (%s)", compile_seconds, out)
    return out


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.paged_attention.argtypes = [ptr] * 7 + [i32] * 8 + [i64] * 4 + [ctypes.c_float, i32]
    lib.paged_attention.restype = i32
    lib.rope_write_attend.argtypes = [ptr] * 10 + [i32] * 8 + [i64] * 4 + [ctypes.c_float, i32]
    lib.rope_write_attend.restype = i32
    f32 = ctypes.c_float
    lib.rms_norm_rows.argtypes = [ptr] * 3 + [i32, i32, f32]
    lib.add_rms_norm.argtypes = [ptr] * 5 + [i32, i32, f32]
    lib.silu_mul.argtypes = [ptr, ptr, i32, i32]
    for name in ("rms_norm_rows", "add_rms_norm", "silu_mul"):
        getattr(lib, name).restype = None
    lib.apply_bitmask_rows.argtypes = [ptr, ptr, ptr, i32, i32, i32]
    lib.apply_bitmask_rows.restype = None
    lib.row_entropy.argtypes = [ptr, ptr, i32, i32, i32]
    lib.row_entropy.restype = None
    lib.js_rows.argtypes = [ptr, ptr, i32, ptr, ptr, i32, ptr, ptr, ptr, i32, i32]
    lib.js_rows.restype = i32
    lib.row_argmax.argtypes = [ptr, i32, ptr, ptr, i32, i32]
    lib.row_argmax.restype = i32
    lib.int4_matmul.argtypes = [ptr] * 5 + [i32] * 4
    lib.int4_matmul.restype = i32
    lib.f32_matmul.argtypes = [ptr] * 4 + [i32] * 4
    lib.f32_matmul.restype = i32
    lib.stack_scratch.argtypes = [i32] * 6
    lib.stack_scratch.restype = i64
    lib.lean_stack.argtypes = [ptr, ptr, i32] + [ptr] * 12 + [i32] * 11 + [i64] * 4 + [f32, f32, i32]
    lib.lean_stack.restype = i32
    return lib
