"""Paged attention (adasd_core.paged_attention): the CPU kernel and the torch fallback against a naive
float64 reference, batch invariance, garbage past each row's position, and the fallback's triggers."""

import logging
import re
from pathlib import Path

import pytest
import torch

from adasd_core import paged_attention as pa

BS = 16
LENGTHS = [1, 16, 37, 300, 7, 129]  # keys per sequence: one token, one block exactly, ragged tails, many blocks


def make_batch(lengths: list[int], rows: list[int], H: int, Hkv: int, D: int, seed: int = 0, spare: int = 5):
    """A pool whose slots hold NaN except each sequence's keys 0..L-1, random non-contiguous tables
    padded with a never-written block, and each sequence's last rows[b] positions as query rows."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // BS) for n in lengths]
    m, NB = max(need) + 1, sum(need) + spare
    ids = torch.randperm(NB, generator=g)
    pad = int(ids[-1])  # never written: NaN throughout
    k_cache = torch.full((Hkv, NB, BS, D), float("nan"))
    v_cache = torch.full((Hkv, NB, BS, D), float("nan"))
    tables = torch.full((len(lengths), m), pad, dtype=torch.int32)
    used = 0
    for b, (n, c) in enumerate(zip(lengths, need)):
        tables[b, :c] = ids[used : used + c]
        used += c
        for p in range(n):
            blk, off = tables[b, p // BS], p % BS
            k_cache[:, blk, off] = torch.randn(Hkv, D, generator=g)
            v_cache[:, blk, off] = torch.randn(Hkv, D, generator=g)
    q_seq = torch.tensor([b for b, r in enumerate(rows) for _ in range(r)], dtype=torch.int32)
    q_pos = torch.tensor([n - r + j for n, r in zip(lengths, rows) for j in range(r)], dtype=torch.int32)
    q = torch.randn(len(q_seq), H, D, generator=g)
    return q, k_cache, v_cache, tables, q_seq, q_pos


def reference(q, k_cache, v_cache, tables, q_seq, q_pos, scale):
    """Row by row in float64: the row's keys gathered position by position, softmax, weighted values."""
    H, Hkv = q.size(1), k_cache.size(0)
    out = torch.empty_like(q)
    for t in range(q.size(0)):
        p = torch.arange(int(q_pos[t]) + 1)
        blk = tables[int(q_seq[t])].long()[p // BS]
        keys = k_cache[:, blk, p % BS].double().repeat_interleave(H // Hkv, 0)  # [H, n, D]
        values = v_cache[:, blk, p % BS].double().repeat_interleave(H // Hkv, 0)
        w = torch.softmax(torch.einsum("hd,hnd->hn", q[t].double(), keys) * scale, -1)
        out[t] = torch.einsum("hn,hnd->hd", w, values).float()
    return out


# query rows per sequence; past 8 the kernel splits a sequence's rows into runs
ROWS = {"1": [1] * len(LENGTHS), "6": [min(6, n) for n in LENGTHS], "ragged": [1, 6, 6, 1, 3, 6],
        "11": [min(11, n) for n in LENGTHS]}
SHAPES = [(9, 3, 64), (4, 4, 32)]  # (H, H_kv, D): grouped heads, and one query head per KV head


@pytest.fixture(scope="module")
def kernel():
    assert pa.kernel_available(), "the CPU kernel did not build (see the warning)"


@pytest.mark.parametrize("H,Hkv,D", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl", ["kernel", "torch"])
def test_matches_reference(kernel, impl, rows, H, Hkv, D):
    batch = make_batch(LENGTHS, ROWS[rows], H, Hkv, D)
    fn = pa.paged_attention if impl == "kernel" else pa.paged_attention_torch
    out = fn(*batch, D**-0.5)
    assert out.shape == batch[0].shape and torch.isfinite(out).all()  # the NaN past each row stays out
    torch.testing.assert_close(out, reference(*batch, D**-0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,Hkv,D", SHAPES)
@pytest.mark.parametrize("rows", ["ragged", "11"])
def test_rows_batch_invariant(kernel, rows, H, Hkv, D):
    rows = ROWS[rows]
    q, k_cache, v_cache, tables, q_seq, q_pos = make_batch(LENGTHS, rows, H, Hkv, D)
    batched = pa.paged_attention(q, k_cache, v_cache, tables, q_seq, q_pos, D**-0.5)
    start = 0
    for b, r in enumerate(rows):
        sl = slice(start, start + r)
        alone = pa.paged_attention(q[sl], k_cache, v_cache, tables[b : b + 1], torch.zeros(r, dtype=torch.int32),
                                   q_pos[sl], D**-0.5)
        assert torch.equal(alone, batched[sl]), b
        last = pa.paged_attention(q[sl][-1:], k_cache, v_cache, tables[b : b + 1], torch.zeros(1, dtype=torch.int32),
                                  q_pos[sl][-1:], D**-0.5)
        assert torch.equal(last, batched[sl][-1:]), b
        start += r
    # the same rows in another batch order
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    starts = torch.tensor(rows).cumsum(0) - torch.tensor(rows)
    idx = torch.cat([torch.arange(int(starts[b]), int(starts[b]) + rows[b]) for b in perm])
    q_seq2 = torch.cat([torch.full((rows[b],), j, dtype=torch.int32) for j, b in enumerate(perm)])
    other = pa.paged_attention(q[idx], k_cache, v_cache, tables[perm], q_seq2, q_pos[idx], D**-0.5)
    assert torch.equal(other, batched[idx])


def test_layer_view_of_a_bigger_buffer(kernel):
    """K, V of one layer as a strided view ([H_kv, layers, NB, bs, D][:, 1]): read in place, same answer."""
    q, k_cache, v_cache, tables, q_seq, q_pos = make_batch(LENGTHS, ROWS["6"], 9, 3, 64)
    k_all = torch.randn(3, 2, *k_cache.shape[1:])
    v_all = torch.randn(3, 2, *v_cache.shape[1:])
    k_all[:, 1], v_all[:, 1] = k_cache, v_cache
    view = pa.paged_attention(q, k_all[:, 1], v_all[:, 1], tables, q_seq, q_pos, 0.125)
    assert torch.equal(view, pa.paged_attention(q, k_cache, v_cache, tables, q_seq, q_pos, 0.125))


def test_out_of_range_block_raises(kernel):
    q, k_cache, v_cache, tables, q_seq, q_pos = make_batch([20], [1], 4, 4, 32)
    tables[0, 0] = k_cache.size(1)
    with pytest.raises(IndexError, match="block id"):
        pa.paged_attention(q, k_cache, v_cache, tables, q_seq, q_pos, 0.125)


def test_one_openmp_runtime(kernel):
    """The kernel shares torch's OpenMP runtime rather than loading a second one."""
    maps = Path("/proc/self/maps").read_text()
    runtimes = set(re.findall(r"\s(/\S*/lib(?:gomp|iomp5|omp)\b[^/\s]*\.so[^/\s]*)$", maps, re.MULTILINE))
    assert len(runtimes) == 1, runtimes


def test_fallback_without_kernel(kernel, monkeypatch):
    batch = make_batch(LENGTHS, ROWS["ragged"], 9, 3, 64)
    expected = pa.paged_attention(*batch, 0.125)
    monkeypatch.setattr(pa, "_library", lambda: None)
    fallback = pa.paged_attention(*batch, 0.125)
    torch.testing.assert_close(fallback, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fallback, reference(*batch, 0.125), atol=1e-5, rtol=1e-5)


def test_fallback_for_other_dtypes(kernel, monkeypatch):
    q, k_cache, v_cache, tables, q_seq, q_pos = make_batch([40, 9], [3, 1], 4, 4, 32)
    monkeypatch.setattr(pa, "paged_attention_torch", lambda *a: "torch")
    assert pa.paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, q_seq, q_pos, 0.1) == "torch"


def test_no_compiler_warns_once_and_falls_back(kernel, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(pa, "_tried", False)
    monkeypatch.setattr(pa, "_lib", None)
    batch = make_batch([40, 9], [3, 1], 9, 3, 64)
    with caplog.at_level(logging.WARNING, logger=pa.__name__):
        assert not pa.kernel_available()
        out = pa.paged_attention(*batch, 0.125)
    assert len([r for r in caplog.records if "torch fallback" in r.message]) == 1
    torch.testing.assert_close(out, reference(*batch, 0.125), atol=1e-5, rtol=1e-5)


def test_disk_cache(kernel, monkeypatch, tmp_path):
    """Built once into $XDG_CACHE_HOME/adasd/kernels, then loaded from there without compiling."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pa, "compile_seconds", None)
    path = pa._build()
    assert path.parent == tmp_path / "adasd" / "kernels" and pa.compile_seconds is not None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind
    monkeypatch.setattr(pa, "compile_seconds", None)
    assert pa._build() == path and pa.compile_seconds is None


def rotate(x, cos, sin):
    """Rotary as the lean forward writes it (sin's first half negated): x cos + roll(x, D / 2) sin."""
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin


@pytest.mark.parametrize("H,Hkv,D", SHAPES)
def test_rope_write_attend_matches_rotary_then_write_then_attention(kernel, H, Hkv, D):
    """One call from the fused projection: q and k rotated, k and v written at each row's block and
    offset (nothing else in the pool changes), then paged attention over the written keys."""
    q, k_cache, v_cache, tables, q_seq, q_pos = make_batch(LENGTHS, ROWS["ragged"], H, Hkv, D, seed=3)
    T = q.size(0)
    g = torch.Generator().manual_seed(4)
    fused = torch.randn(T, (H + 2 * Hkv) * D, generator=g)
    angles = torch.rand(T, D // 2, generator=g) * 6
    cos = torch.cat((angles.cos(), angles.cos()), -1)
    sin = torch.cat((-angles.sin(), angles.sin()), -1)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    qkv = fused.view(T, H + 2 * Hkv, D)
    q_rot = rotate(qkv[:, :H], cos[:, None], sin[:, None])
    k_rot = rotate(qkv[:, H : H + Hkv], cos[:, None], sin[:, None])
    blk = tables[q_seq.long(), q_pos.long() // BS].long()
    k_want[:, blk, q_pos.long() % BS] = k_rot.transpose(0, 1)
    v_want[:, blk, q_pos.long() % BS] = qkv[:, H + Hkv :].transpose(0, 1)
    want = reference(q_rot, k_want, v_want, tables, q_seq, q_pos, D**-0.5).reshape(T, H * D)
    got = pa.rope_write_attend(fused, cos, sin, k_cache, v_cache, tables, q_seq, q_pos, H, D**-0.5)
    torch.testing.assert_close(k_cache, k_want, atol=1e-6, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(v_cache, v_want, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(IndexError):
        pa.rope_write_attend(fused, cos, sin, k_cache, v_cache, tables, q_seq, q_pos + 10_000, H, D**-0.5)


@pytest.mark.parametrize("C", [576, 70])  # a multiple of the 16 lanes, and a ragged tail
def test_norms_and_gated_product_match_torch_and_are_batch_invariant(kernel, C):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(7, C, generator=g) * 3, torch.randn(7, C, generator=g)
    w = torch.rand(C, generator=g) + 0.5
    eps = 1e-5
    torch.testing.assert_close(pa.rms_norm(x, w, eps), torch.nn.functional.rms_norm(x, (C,), w, eps))
    total, normed = pa.add_rms_norm(x, y, w, eps)
    assert torch.equal(total, x + y)
    torch.testing.assert_close(normed, torch.nn.functional.rms_norm(x + y, (C,), w, eps))
    gu = torch.randn(7, 2 * C, generator=g) * 4
    torch.testing.assert_close(pa.silu_mul(gu), torch.nn.functional.silu(gu[:, :C]) * gu[:, C:])
    for r in (0, 3, 6):  # a row alone gives the same bits as in the batch
        assert torch.equal(pa.rms_norm(x[r : r + 1], w, eps), pa.rms_norm(x, w, eps)[r : r + 1])
        assert torch.equal(pa.add_rms_norm(x[r : r + 1], y[r : r + 1], w, eps)[1], normed[r : r + 1])
        assert torch.equal(pa.silu_mul(gu[r : r + 1]), pa.silu_mul(gu)[r : r + 1])


@pytest.mark.parametrize("V", [49152, 1000, 7])  # the default vocabulary, a ragged tail, shorter than the lanes
def test_row_entropy_matches_float64_and_is_batch_invariant(kernel, V):
    from adasd_core.verification import entropy

    g = torch.Generator().manual_seed(V)
    # flat to sharp rows, then a one-hot, a uniform one and one with zeros and subnormals
    z = torch.randn(8, V, generator=g) * torch.tensor([0.01, 0.3, 1, 2, 4, 8, 20, 60])[:, None]
    special = torch.zeros(3, V)
    special[0, V // 2] = 1
    special[1] = 1 / V
    special[2, :4] = torch.tensor([0.5, 0.25, 0.25 - 1e-40, 1e-40])
    p = torch.cat((torch.softmax(z, -1), special))
    q = p.double().clamp_min(1e-30)
    want = -(q * q.log()).sum(-1)
    got = pa.row_entropy(p)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6), (got, want)
    assert torch.equal(entropy(p), got)  # verification's entropy runs on it on the CPU
    for r in range(p.size(0)):  # a row alone gives the same bits as in the batch
        assert torch.equal(pa.row_entropy(p[r : r + 1].clone()), got[r : r + 1])


@pytest.mark.parametrize("V", [12, 49152 + 7])
def test_row_argmax_and_js_rows_give_the_gathered_torch_paths_answers(kernel, V):
    """The verify's row kernels against the tensor ops on gathered rows: argmax (the first on ties) and the
    JS distance with the same bits, with the rows' entropies given or summed in the pass; a row outside the
    tensor is an IndexError, not a read past it."""
    from adasd_core.verification import entropy, js_distance

    g = torch.Generator().manual_seed(V)
    p = torch.softmax(torch.randn(9, V, generator=g) * torch.linspace(0.1, 30, 9)[:, None], -1)
    q = torch.softmax(torch.randn(6, V, generator=g) * 4, -1)
    p[2] = 0.0
    p[2, V // 3] = p[2, V - 1] = p[2, (V // 3 + 32) % V] = 0.25  # ties (two in one lane when V > 64): the first wins
    p[4, V - 1] = 2.0  # the largest in the tail past the last full vector
    rows = torch.tensor([2, 0, 8, 2, 4, 5])
    assert torch.equal(pa.row_argmax(p, rows), p[rows].max(-1).indices)
    assert pa.row_argmax(p, rows)[0] == min(V // 3, (V // 3 + 32) % V) and pa.row_argmax(p, rows)[4] == V - 1
    qrows = torch.tensor([1, 0, 5, 3, 3, 2])
    want = js_distance(p[rows], q[qrows])  # the tensor ops (no rows given)
    assert torch.equal(pa.js_rows(p, rows, q, qrows), want)
    assert torch.equal(pa.js_rows(p, rows, q, qrows, entropy(p)[rows], entropy(q)[qrows]), want)
    assert torch.equal(js_distance(p, q, rows, qrows), want)  # verification's rows path runs on it
    assert torch.equal(pa.js_rows(p, rows, p, rows), torch.zeros(6))  # a distribution against itself
    for bad in (torch.tensor([0, 9]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            pa.row_argmax(p, bad)
        with pytest.raises(IndexError):
            pa.js_rows(p, bad, q, torch.zeros_like(bad))
    with pytest.raises(IndexError):
        pa.js_rows(p, rows[:2], q, torch.tensor([0, 6]))


def test_lean_forward_runs_the_fused_ops_and_agrees_with_the_plain_ops(kernel, monkeypatch):
    """The tiny target through the paged pool: the one-call layer ops are what runs on the CPU, and its
    logits over a prefill, a ragged batch and a decode step match the plain tensor ops'."""
    from transformers import AutoModelForCausalLM

    from adasd_core.kv_cache import make_pool
    from adasd_core.model_files import TINY_DIR

    model = AutoModelForCausalLM.from_pretrained(TINY_DIR / "target", torch_dtype=torch.float32).eval()
    calls = []
    monkeypatch.setattr(pa, "silu_mul", lambda gu, f=pa.silu_mul: calls.append(1) or f(gu))

    def run():
        pool = make_pool(model, 3, 256)
        g = torch.Generator().manual_seed(0)
        out = [pool.forward([s], [torch.randint(0, 500, (n,), generator=g).tolist()], all_logits=True)
               for s, n in enumerate((40, 17, 3))]
        out.append(pool.forward([0, 1, 2], [[5, 6, 7], [8], [9, 10]], all_logits=True))
        return out + [pool.forward([0, 1, 2], [[1], [2], [3]])]

    fused = run()
    assert calls, "the fused layer ops did not run"
    monkeypatch.setattr(pa, "kernel_available", lambda: False)  # torch's ops throughout
    for a, b in zip(fused, run()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
