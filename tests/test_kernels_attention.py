"""Gated attention: Triton forward and every gradient (q, k, v, value_gate) against the eager reference.

CPU: the Triton interpreter (conftest sets TRITON_INTERPRET=1 before triton is imported), fp32, tiny shapes.
GPU (skipped without CUDA): bf16/fp16 at realistic shapes under the flash-attn tolerance rule.
"""

import threading

import pytest
import torch
import triton
from pill_kernels import gated_attention, gated_attention_ref
from pill_kernels import launch as pl
from pill_kernels.attention import decode, forward, op, tiles
from triton.runtime import _allocation

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
requires_triton_path = pytest.mark.skipif(
    not (CUDA or op._INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1 set before triton import"
)


def _inputs(q_shape, k_shape, gate, dtype=torch.float32, device=DEV, seed=0):
    """q, k, v leaves and the gate VALUE g (keys x query heads) in one of several patterns."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(q_shape, generator=gen)
    k = torch.randn(k_shape, generator=gen)
    v = torch.randn(k_shape, generator=gen)
    g_shape = k_shape[:-2] + (q_shape[-2],)
    visual = torch.rand(k_shape[:-2], generator=gen) < 0.4  # modality_mask over keys
    if gate is None:
        g = None
    elif gate == "random":  # tanh(logit) at visual tokens, 1 at text tokens (what the model passes)
        g = torch.where(visual[..., None], torch.tanh(2 * torch.randn(g_shape, generator=gen)), torch.ones(g_shape))
    elif gate == "all_text":
        g = torch.ones(g_shape)
    elif gate == "all_visual":
        g = torch.tanh(2 * torch.randn(g_shape, generator=gen))
    else:  # a constant gate value at visual tokens: 0 (stage-2 init), +1, -1
        g = torch.where(visual[..., None], torch.full(g_shape, float(gate)), torch.ones(g_shape))
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    if g is not None:
        leaves.append(g.to(device=device, dtype=dtype).requires_grad_())
    return leaves


def _run(fn, leaves, do, **kw):
    q, k, v = leaves[:3]
    g = leaves[3] if len(leaves) > 3 else None
    out = fn(q, k, v, g, **kw)
    grads = torch.autograd.grad(out, leaves, do)
    return [out.detach(), *grads]


def _triton(q, k, v, g, causal=True, cu_seqlens=None, max_seqlen=None, softmax_scale=None, kv_seqlens=None):
    """The public function: the custom op training takes (the decode path when no input needs a gradient)."""
    return gated_attention(
        q,
        k,
        v,
        g,
        causal=causal,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        softmax_scale=softmax_scale,
        kv_seqlens=kv_seqlens,
    )


def _check_fp32(leaves, **kw):
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(leaves[0].shape, generator=gen).to(leaves[0].device)
    got = _run(_triton, leaves, do, **kw)
    ref = _run(gated_attention_ref, leaves, do, **kw)
    names = ["out", "dq", "dk", "dv", "dgate"]
    for name, a, b in zip(names[: len(got)], got, ref, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    return got


# ---------------------------------------------------------------------------------------------- CPU, interpreter
@requires_triton_path
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "b,t,hq,hkv,d",
    [
        (2, 17, 4, 2, 16),  # GQA 2:1, odd length
        (1, 1, 2, 2, 32),  # single token
        (2, 33, 3, 1, 64),  # MQA, 3 query heads, head dim 64
        (1, 17, 2, 2, 128),  # head dim 128
        (1, 20, 2, 1, 24),  # head dim not a power of two (masked tile)
        (2, 37, 9, 3, 64),
    ],  # SmolLM2-135M: 9 query / 3 KV heads (not a power of two), head dim 64
)
def test_padded_random_gate(b, t, hq, hkv, d, causal):
    _check_fp32(_inputs((b, t, hq, d), (b, t, hkv, d), "random"), causal=causal)


@requires_triton_path
@pytest.mark.parametrize("gate", [None, "all_text", "all_visual", 0.0, 1.0, -1.0])
def test_gate_values(gate):
    _check_fp32(_inputs((2, 19, 4, 16), (2, 19, 2, 16), gate), causal=True)


@requires_triton_path
def test_gate_zero_removes_visual_values_and_gqa_heads_differ():
    q, k, v, g = _inputs((1, 9, 2, 16), (1, 9, 1, 16), "all_visual")
    with torch.no_grad():
        g[:, :, 0] = 0.0  # query head 0 sees no value at all, head 1 keeps its own gate
        out = _triton(q, k, v, g)
    assert out[:, :, 0].abs().max() == 0
    assert out[:, :, 1].abs().max() > 0


@requires_triton_path
@pytest.mark.parametrize("causal,hq", [(True, 1), (False, 1)])
def test_length_333(causal, hq):
    _check_fp32(_inputs((1, 333, hq, 16), (1, 333, 1, 16), "random", seed=3), causal=causal)


@requires_triton_path
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_no_cross_document_attention(causal):
    cu = torch.tensor([0, 5, 22, 23, 40], dtype=torch.int32, device=DEV)  # includes a 1-token document
    leaves = _inputs((40, 4, 16), (40, 2, 16), "random", seed=4)
    got = _check_fp32(leaves, causal=causal, cu_seqlens=cu, max_seqlen=17)
    # independent check: document 2 alone in the padded layout gives the same rows
    q, k, v, g = (t.detach()[5:22].unsqueeze(0) for t in leaves)
    alone = _triton(q, k, v, g, causal=causal)[0]
    torch.testing.assert_close(got[0][5:22], alone, atol=1e-5, rtol=1e-5)


@requires_triton_path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_smollm2_shape_packed(dtype):
    """SmolLM2-135M's attention (9 query / 3 KV heads, head dim 64), packed with a 1-token document and tokens
    past the last document, forward and every gradient (fp16 by the flash-attn rule; bf16 dots are wrong in
    the interpreter)."""
    cu = torch.tensor([0, 1, 19, 52], dtype=torch.int32, device=DEV)
    leaves = _inputs((55, 9, 64), (55, 3, 64), "random", seed=16)
    if dtype == torch.float32:
        got = _check_fp32(leaves, causal=True, cu_seqlens=cu, max_seqlen=33)
        assert all(t[52:].abs().max() == 0 for t in got)
    else:
        _check_low_precision(leaves, dtype, causal=True, cu_seqlens=cu, max_seqlen=33)


@requires_triton_path
def test_gate_gradient_is_deterministic():
    """The gate's gradient is summed from per-query-block partials, not with atomics: bit-identical reruns."""
    leaves = _inputs((1, 45, 9, 64), (1, 45, 3, 64), "random", seed=17)
    do = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(3)).to(DEV)
    first, second = _run(_triton, leaves, do), _run(_triton, leaves, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@requires_triton_path
def test_one_autograd_path(monkeypatch):
    """gated_attention (what training calls) is the custom op: its backward is one call of the registered bwd op
    (a second autograd path, e.g. an autograd.Function around the kernels, would not call it)."""
    leaves = _inputs((1, 17, 9, 64), (1, 17, 3, 64), "random", seed=18)
    do = torch.randn(leaves[0].shape, generator=torch.Generator().manual_seed(4)).to(DEV)
    calls = []
    real_bwd = op.gated_attention_bwd
    monkeypatch.setattr(op, "gated_attention_bwd", lambda *a: calls.append(1) or real_bwd(*a))
    _run(_triton, leaves, do)
    assert calls == [1]


@requires_triton_path
def test_varlen_tokens_past_last_document_are_zero():
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device=DEV)
    got = _check_fp32(_inputs((20, 2, 16), (20, 2, 16), "random", seed=5), cu_seqlens=cu, max_seqlen=None)
    for t in got:
        assert t[16:].abs().max() == 0


@requires_triton_path
@pytest.mark.parametrize("causal", [True, False])
def test_right_padding_kv_seqlens(causal):
    leaves = _inputs((3, 20, 2, 16), (3, 20, 1, 16), "random", seed=6)
    lens = torch.tensor([20, 7, 1], dtype=torch.int32, device=DEV)
    got = _check_fp32(leaves, causal=causal, kv_seqlens=lens)
    dk, dv, dg = got[2], got[3], got[4]
    for t in (dk, dv, dg):  # padded keys contribute nothing, so they get no gradient
        assert t[1, 7:].abs().max() == 0 and t[2, 1:].abs().max() == 0


@requires_triton_path
@pytest.mark.parametrize(
    "use_tma,overlap", [(True, True), (True, False), (False, True)], ids=["tma-overlap", "tma-in-order", "pointers"]
)
def test_forward_tma_and_pointer_loads(monkeypatch, use_tma, overlap):
    """The forward's three loops: K/V through TMA descriptors (zero fill past the sequence / head dim, no masks)
    with the softmax overlapping the previous P V (look-ahead Q K^T), TMA in order, and the pointer fallback.
    Each equals the reference on a packed batch with a non-power-of-two head dim, and on a right-padded cache
    whose padding holds NaN (no path may read past kv_seqlens)."""
    monkeypatch.setattr(tiles, "USE_TMA", use_tma)
    monkeypatch.setattr(tiles, "FWD_OVERLAP", overlap)
    seen = []

    def spy(kernel, grid, *args, **kwargs):
        if kernel is forward._gated_attn_fwd_kernel:
            seen.append((kwargs["TMA"], kwargs["OVERLAP"]))
        return ga_launch(kernel, grid, *args, **kwargs)

    ga_launch = forward.launch
    monkeypatch.setattr(forward, "launch", spy)
    cu = torch.tensor([0, 1, 19, 40], dtype=torch.int32, device=DEV)
    _check_fp32(_inputs((44, 6, 24), (44, 2, 24), "random", seed=21), causal=True, cu_seqlens=cu, max_seqlen=21)
    q, k, v, g = (t.detach() for t in _inputs((3, 20, 2, 16), (3, 20, 1, 16), "random", seed=22))
    lens = torch.tensor([20, 7, 1], dtype=torch.int32, device=DEV)
    ref = gated_attention_ref(q, k, v, g, causal=False, kv_seqlens=lens)
    k[1, 7:], v[1, 7:], k[2, 1:], v[2, 1:] = (float("nan"),) * 4
    with torch.enable_grad():  # the training op (the forward kernel), not the decode path
        got = _triton(q.requires_grad_(), k, v, g, causal=False, kv_seqlens=lens).detach()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert seen and set(seen) == {(use_tma, use_tma and overlap)}


def test_scratch_allocator_is_set_per_thread_and_never_replaced():
    """TMA descriptors need Triton's scratch allocator, a ContextVar: a thread without one (autograd's device
    threads, where checkpointing re-runs the forward) gets ours; a user's own allocator stays."""
    seen = {}

    def fresh_thread():
        before = _allocation._allocator.get()
        pl.ensure_scratch_allocator()
        seen["fresh"] = (before, _allocation._allocator.get())

        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        triton.set_allocator(mine)
        pl.ensure_scratch_allocator()
        seen["user"] = (mine, _allocation._allocator.get())

    worker = threading.Thread(target=fresh_thread)
    worker.start()
    worker.join()
    before, after = seen["fresh"]
    assert isinstance(before, _allocation.NullAllocator) and after is pl._torch_scratch
    assert seen["user"][0] is seen["user"][1]


def test_tma_needs_aligned_rows():
    """Rows whose starts are not 16-byte aligned (head dim 6 in fp32: 24-byte rows) take the pointer loads."""
    ok = torch.empty(4, 2, 8)
    assert tiles._tma_ok(ok, ok) == tiles.USE_TMA
    assert not tiles._tma_ok(torch.empty(4, 2, 6), ok)
    assert not tiles._tma_ok(torch.empty(4, 2, 16)[..., ::2], ok)  # head dim not contiguous
    assert not tiles._tma_ok(torch.empty(4 * 2 * 8 + 1)[1:].view(4, 2, 8), ok)  # base 4 bytes off


@requires_triton_path
@pytest.mark.parametrize("tq,tk", [(1, 37), (3, 20), (17, 40), (20, 5)])
def test_decode_bottom_right_alignment(tq, tk):
    """KV-cache decode: queries are the LAST tq positions of tk keys (tq > tk: early rows see nothing)."""
    got = _check_fp32(_inputs((2, tq, 4, 32), (2, tk, 2, 32), "random", seed=7), causal=True)
    if tq > tk:
        assert got[0][:, : tq - tk].abs().max() == 0


@requires_triton_path
def test_decode_one_token_against_padded_cache():
    leaves = _inputs((3, 1, 4, 16), (3, 20, 2, 16), "random", seed=12)
    got = _check_fp32(leaves, causal=True, kv_seqlens=torch.tensor([20, 9, 1], device=DEV))
    assert got[2][1, 9:].abs().max() == 0 and got[3][2, 1:].abs().max() == 0


@requires_triton_path
def test_decode_matches_last_rows_of_full_sequence():
    q, k, v, g = (t.detach() for t in _inputs((1, 21, 2, 16), (1, 21, 2, 16), "random", seed=8))
    full = _triton(q, k, v, g)
    step = _triton(q[:, -1:], k, v, g)  # last token's query against the whole cache
    torch.testing.assert_close(step, full[:, -1:], atol=1e-5, rtol=1e-5)


@requires_triton_path
def test_softmax_scale_and_reduced_precision_interpreter():
    _check_fp32(_inputs((1, 18, 2, 16), (1, 18, 2, 16), "random", seed=9), softmax_scale=0.3)
    # fp16 and bf16 go through the interpreter too (bf16 dots upcast): flash-attn rule vs the fp32 reference
    for dtype in (torch.float16, torch.bfloat16):
        _check_low_precision(_inputs((2, 24, 4, 32), (2, 24, 2, 32), "random", seed=10), dtype, causal=True)


def test_backend_switch(monkeypatch):
    q, k, v, g = (t.detach() for t in _inputs((1, 5, 2, 16), (1, 5, 1, 16), "random", device="cpu"))
    calls = []
    monkeypatch.setattr(
        op,
        "_triton_attention",
        lambda *a: calls.append(a)
        or gated_attention_ref(
            *a[:4], causal=a[4], cu_seqlens=a[5], max_seqlen=a[6], softmax_scale=a[7], kv_seqlens=a[8]
        ),
    )
    monkeypatch.setattr(op, "_INTERPRETED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gated_attention(q, k, v, g)
    assert len(calls) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = gated_attention(q, k, v, g)
    assert len(calls) == 1  # CPU tensors without the interpreter: the reference
    torch.testing.assert_close(out, gated_attention_ref(q, k, v, g))


def test_reference_is_plain_attention_with_gated_values():
    """The reference itself against an independent formula: softmax(QK^T) (g * V), GQA by repetition."""
    q, k, v, g = (t.detach().double() for t in _inputs((1, 6, 4, 8), (1, 6, 2, 8), "random", device="cpu"))
    out = gated_attention_ref(q, k, v, g, causal=True)
    for h in range(4):
        s = q[0, :, h] @ k[0, :, h // 2].T / 8**0.5
        s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
        want = torch.softmax(s, -1) @ (v[0, :, h // 2] * g[0, :, h, None])
        torch.testing.assert_close(out[0, :, h], want)


@pytest.mark.parametrize("bad", ["heads", "gate", "layout", "dtype"])
def test_errors(bad):
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    g = torch.ones(1, 4, 2)
    if bad == "heads":
        args = (q, k, v)
    elif bad == "gate":
        args = (q[:, :, :2], k, v, g[:, :3])
    elif bad == "dtype":
        args = (q[:, :, :2], k.double(), v)
    else:
        args = (q[0], k[0], v[0])
    with pytest.raises(ValueError):
        gated_attention(*args)


# ---------------------------------------------------------------------------------------------- flash-attn rule
def _check_low_precision(leaves32, dtype, **kw):
    """Error of the kernel at `dtype` vs the fp32 reference <= 2x the error of the same-dtype PyTorch reference
    + eps (flash-attn's rule); eps is the rounding error of the reference values at `dtype`."""
    do32 = torch.randn(leaves32[0].shape, generator=torch.Generator().manual_seed(2)).to(leaves32[0].device)
    low = [t.detach().to(dtype).requires_grad_() for t in leaves32]
    ref32 = _run(gated_attention_ref, leaves32, do32, **kw)
    ref_low = _run(gated_attention_ref, low, do32.to(dtype), **kw)
    got = _run(_triton, low, do32.to(dtype), **kw)
    for name, a, b, r in zip(["out", "dq", "dk", "dv", "dgate"][: len(got)], got, ref_low, ref32, strict=True):
        err = (a.float() - r).abs().max().item()
        base = (b.float() - r).abs().max().item()
        eps = 2 * (r + 0.3 - 0.3 - r).abs().max().item() + 2 * (r.to(dtype).float() - r).abs().max().item()
        print(f"{dtype} {name}: kernel err {err:.3e}, same-dtype torch err {base:.3e}, eps {eps:.1e}")
        assert err <= 2 * base + eps, name


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 32, 128), (32, 8, 128), (16, 4, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_padded(dtype, hq, hkv, d, causal):
    _check_low_precision(_inputs((2, 1031, hq, d), (2, 1031, hkv, d), "random", seed=11), dtype, causal=causal)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_varlen_padding_decode():
    cu = torch.tensor([0, 300, 301, 1100, 2048], dtype=torch.int32, device="cuda")
    _check_low_precision(
        _inputs((2048, 32, 128), (2048, 8, 128), "random"), torch.bfloat16, cu_seqlens=cu, max_seqlen=799
    )
    lens = torch.tensor([512, 100], dtype=torch.int32, device="cuda")
    _check_low_precision(_inputs((2, 512, 32, 128), (2, 512, 8, 128), "random"), torch.bfloat16, kv_seqlens=lens)
    _check_low_precision(_inputs((4, 1, 32, 128), (4, 777, 8, 128), "random"), torch.bfloat16, causal=True)


# ---------------------------------------------------------------------------------------------- split-KV decode
@requires_triton_path
@pytest.mark.parametrize("tq,tk,hq,hkv,d", [(1, 70, 4, 2, 16), (3, 45, 4, 1, 24), (16, 33, 2, 2, 32), (1, 1, 2, 1, 16)])
@pytest.mark.parametrize("gate", [None, "random"])
def test_split_kv_decode_matches_reference(tq, tk, hq, hkv, d, gate):
    """Generation (no gradient, Tq <= 16): keys split over programs (the interpreter uses chunks of two 16-key
    tiles, so several splits and empty ones are covered), partial softmaxes combined."""
    leaves = [t.detach() for t in _inputs((2, tq, hq, d), (2, tk, hkv, d), gate, seed=13)]
    q, k, v = leaves[:3]
    g = leaves[3] if gate else None
    with torch.no_grad():
        got = gated_attention(q, k, v, g, causal=True)
    torch.testing.assert_close(got, gated_attention_ref(q, k, v, g, causal=True), atol=1e-5, rtol=1e-5)


@requires_triton_path
def test_split_kv_decode_right_padded_cache_and_dispatch(monkeypatch):
    leaves = [t.detach() for t in _inputs((3, 1, 4, 16), (3, 50, 2, 16), "random", seed=14)]
    lens = torch.tensor([50, 17, 1], device=DEV)
    calls = []
    monkeypatch.setattr(op, "_decode", lambda *a: calls.append(1) or _orig_decode(*a))
    with torch.no_grad():
        got = gated_attention(*leaves, causal=True, kv_seqlens=lens)
    assert calls == [1]
    torch.testing.assert_close(got, gated_attention_ref(*leaves, causal=True, kv_seqlens=lens), atol=1e-5, rtol=1e-5)
    q = leaves[0].clone().requires_grad_()
    gated_attention(q, *leaves[1:], causal=True, kv_seqlens=lens)  # a gradient is needed: the training kernels
    assert calls == [1]


_orig_decode = decode._decode


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("tq", [1, 5])
def test_gpu_split_kv_decode(tq):
    """bf16 decode against a long right-padded cache: flash-attn rule on the output."""
    q, k, v, g = (t.detach() for t in _inputs((4, tq, 32, 128), (4, 4099, 8, 128), "random", seed=15))
    lens = torch.tensor([4099, 1000, 17, 1], device="cuda")
    ref32 = gated_attention_ref(q, k, v, g, causal=True, kv_seqlens=lens)
    low = [t.to(torch.bfloat16) for t in (q, k, v, g)]
    with torch.no_grad():
        got = gated_attention(*low, causal=True, kv_seqlens=lens)
    base = (gated_attention_ref(*low, causal=True, kv_seqlens=lens).float() - ref32).abs().max().item()
    eps = 2 * (ref32.to(torch.bfloat16).float() - ref32).abs().max().item()
    assert (got.float() - ref32).abs().max().item() <= 2 * base + eps
