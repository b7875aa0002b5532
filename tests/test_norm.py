"""keye.ops.rms_norm / add_rms_norm / rms_norm_rope: the references (CPU) and the CUDA kernels against them."""

import pytest
import torch

import keye.ops
from conftest import RTOL, poison_next_alloc, rel_err
from keye.ops import reference as ref
from keye.model.rope import mrope_cos_sin

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def rope_tables(T, D, offset=0):
    pos = (torch.arange(T) * 37 + offset).expand(3, -1)
    return mrope_cos_sin(pos, D, 1e6, [D // 8, 3 * D // 16, 3 * D // 16])


# ---- references (CPU) --------------------------------------------------------------------------------------

def test_reference_rms_norm_is_the_qwen3_formula():
    x, w = torch.randn(5, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    want = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(ref.rms_norm(x.float(), w.float(), 1e-6).double(), want, rtol=1e-5, atol=1e-6)
    # bf16: normalised in fp32, rounded to bf16, then multiplied by the bf16 weight and rounded again
    xb, wb = x.bfloat16(), w.bfloat16()
    xf = xb.float()
    n = (xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(ref.rms_norm(xb, wb, 1e-6), (wb.float() * n.float()).bfloat16())


def test_reference_add_rms_norm_and_rope_compose_their_parts():
    x, r, w = torch.randn(3, 4, 32), torch.randn(3, 4, 32), torch.randn(32)
    out, s = ref.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, x + r) and torch.equal(out, ref.rms_norm(x + r, w, 1e-5))
    cos, sin = rope_tables(3, 32)
    y = ref.rms_norm_rope(x, torch.ones(32), cos, sin, 1e-6)
    # RoPE rotates pairs (j, j + D/2): each head keeps the norm RMSNorm gave it, sqrt(D)
    assert torch.allclose(y.norm(dim=-1), torch.full((3, 4), 32 ** 0.5), rtol=1e-4)
    # LayerNorm + RoPE in fp32 from bf16: zero mean and unit variance per head before the rotation, so norm sqrt(D)
    k = ref.layer_norm_rope((x * 5 + 3).bfloat16(), torch.ones(32).bfloat16(), torch.zeros(32).bfloat16(), cos, sin,
                            1e-6)
    assert k.dtype == torch.float32
    assert torch.allclose(k.norm(dim=-1), torch.full((3, 4), 32 ** 0.5), rtol=1e-4)


def test_argument_errors_name_the_argument():
    x = torch.randn(4, 2, 64)
    cos, sin = rope_tables(4, 64)
    with pytest.raises(ValueError, match="'weight' must be \\[D\\]"):
        keye.ops.rms_norm(x, torch.ones(63))
    with pytest.raises(ValueError, match="'residual' must have x's shape"):
        keye.ops.add_rms_norm(x, x[:3], torch.ones(64))
    with pytest.raises(ValueError, match="'x' must be 3-D"):
        keye.ops.rms_norm_rope(x[0], torch.ones(64), cos, sin)
    with pytest.raises(ValueError, match="'cos' must be \\[T, D\\]"):
        keye.ops.rms_norm_rope(x, torch.ones(64), cos[:3], sin)
    with pytest.raises(ValueError, match="'bias' must be \\[D\\]"):
        keye.ops.layer_norm_rope(x, torch.ones(64), torch.zeros(32), cos, sin)


# ---- kernels (GPU) -----------------------------------------------------------------------------------------

def _close(got, want, dtype):
    """Within the dtype's tolerance, and nearly all elements identical (only the mean's summation order differs:
    a different last fp32 bit of rsqrt can move a value across a rounding boundary)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) < RTOL[dtype] / 4
    same = (got == want).float().mean().item() if got.numel() else 1.0
    if dtype != torch.float32:  # fp32 has no rounding step to hide a last-bit difference of rsqrt
        assert same > 0.97, same


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", [(1, 2048), (77, 2048), (5, 128), (1000, 64), (3, 100), (9, 7), (0, 2048),
                                    (4, 1)])
def test_rms_norm_kernel_matches_reference(dtype, rows, D):
    x = torch.randn(rows, D, device="cuda", dtype=dtype) * 3
    w = torch.randn(D, device="cuda", dtype=dtype)
    poison_next_alloc(rows * D * x.element_size())
    got = keye.ops.rms_norm(x, w, 1e-6)
    _close(got, ref.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_kernel_on_strided_and_misaligned_rows(dtype):
    base = torch.randn(40, 2 * 2048 + 1, device="cuda", dtype=dtype)
    w = torch.randn(2048, device="cuda", dtype=dtype)
    for x in (base[:, :2048], base[:, 1:2049], base[::3, 8:2056], base.view(-1)[: 37 * 2048].view(37, 2048)):
        _close(keye.ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype)
    x3 = torch.randn(2, 3, 5, 256, device="cuda", dtype=dtype).transpose(1, 2)  # no [rows, D] view: copied
    _close(keye.ops.rms_norm(x3, w[:256], 1e-6), ref.rms_norm(x3, w[:256], 1e-6), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", [(1, 2048), (16, 2048), (333, 2048), (7, 96), (2, 5)])
def test_add_rms_norm_kernel_matches_reference(dtype, rows, D):
    x = torch.randn(rows, D, device="cuda", dtype=dtype)
    r = torch.randn(rows, D, device="cuda", dtype=dtype) * 10
    w = torch.randn(D, device="cuda", dtype=dtype)
    poison_next_alloc(rows * D * x.element_size())
    out, s = keye.ops.add_rms_norm(x, r, w, 1e-6)
    want_out, want_s = ref.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, want_s)  # an elementwise add rounds the same way everywhere
    _close(out, want_out, dtype)
    out2, s2 = keye.ops.add_rms_norm(x[:, : D - 1], r[:, 1:], w[: D - 1], 1e-6)  # unaligned rows
    assert torch.equal(s2, x[:, : D - 1] + r[:, 1:])
    _close(out2, ref.rms_norm(s2, w[: D - 1], 1e-6), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("T,H", [(1, 32), (77, 4), (300, 1), (0, 8)])
def test_rms_norm_rope_kernel_matches_reference(dtype, D, T, H):
    x = torch.randn(T, H, D, device="cuda", dtype=dtype) * 2
    w = torch.randn(D, device="cuda", dtype=dtype)
    cos, sin = (t.cuda() for t in rope_tables(T, D, offset=1000))
    poison_next_alloc(T * H * D * x.element_size())
    got = keye.ops.rms_norm_rope(x, w, cos, sin, 1e-6)
    _close(got, ref.rms_norm_rope(x, w, cos, sin, 1e-6), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("T,H", [(1, 1), (77, 1), (300, 3), (0, 1)])
def test_layer_norm_rope_kernel_matches_reference(dtype, D, T, H):
    x = torch.randn(T, H, D, device="cuda", dtype=dtype) * 3 + 1
    w, b = torch.randn(D, device="cuda", dtype=dtype), torch.randn(D, device="cuda", dtype=dtype)
    cos, sin = (t.cuda() for t in rope_tables(T, D, offset=500))
    poison_next_alloc(T * H * D * 4)
    got = keye.ops.layer_norm_rope(x, w, b, cos, sin, 1e-6)
    want = ref.layer_norm_rope(x, w, b, cos, sin, 1e-6)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < 1e-5  # fp32 throughout: only the mean / variance summation order differs
    # the indexer's key layout: k_proj's output rows as [T, 1, D] views of a wider buffer
    wide = torch.randn(T, 3 * D, device="cuda", dtype=dtype)
    xv = wide[:, D: 2 * D].view(T, 1, D) if T else wide[:, :D].view(0, 1, D)
    got = keye.ops.layer_norm_rope(xv, w, b, cos, sin, 1e-5)
    assert rel_err(got, ref.layer_norm_rope(xv, w, b, cos, sin, 1e-5)) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rope_kernel_on_views(dtype):
    T, H, D = 50, 16, 64
    # the indexer's layout: H * D query values then H weights per row (rows 1040 elements apart)
    qw = torch.randn(T, H * D + H, device="cuda", dtype=dtype)
    w = torch.randn(D, device="cuda", dtype=dtype)
    cos, sin = (t.cuda() for t in rope_tables(T, D))
    wide = torch.cat([cos, sin], 1)  # cos and sin as views with one row stride, 2 D
    cases = [(qw[:, : H * D].reshape(T, H, D), cos, sin),
             (qw[:, 1: H * D + 1].reshape(T, H, D), cos, sin),                       # rows not 8-byte aligned
             (qw[:, : H * D].reshape(T, H, D).transpose(0, 1).contiguous().transpose(0, 1), cos, sin),
             (qw[:, : H * D].reshape(T, H, D), wide[:, :D], wide[:, D:]),
             (qw[:, : H * D].reshape(T, H, D), torch.cat([cos, cos], 1)[:, D:], sin)]  # cos strided, sin not
    for x, c, s in cases:
        _close(keye.ops.rms_norm_rope(x, w, c, s, 1e-6), ref.rms_norm_rope(x, w, c, s, 1e-6), dtype)


@pytest.mark.gpu
def test_gradients_follow_the_reference():
    x = torch.randn(6, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(6, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.rand(128, device="cuda", dtype=torch.bfloat16) + 0.5).requires_grad_()
    b = torch.randn(128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t.cuda() for t in rope_tables(6, 128))
    g1, g2 = torch.randn_like(x), torch.randn_like(x)

    def grads(fn):
        for t in (x, r, w, b):
            t.grad = None
        out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip((g1, g2), outs)])
        return [None if t.grad is None else t.grad.clone() for t in (x, r, w, b)]

    for op, args in ((keye.ops.rms_norm, (x, w)), (keye.ops.add_rms_norm, (x, r, w)),
                     (keye.ops.rms_norm_rope, (x, w, cos, sin)), (keye.ops.layer_norm_rope, (x, w, b, cos, sin))):
        got = grads(lambda: op(*args, 1e-6))
        with keye.ops.force_reference():
            want = grads(lambda: op(*args, 1e-6))
        for mine, theirs in zip(got, want):
            assert (mine is None) == (theirs is None)
            if mine is not None:
                # the same reference computation runs in both backwards
                assert rel_err(mine, theirs) < 1e-6, op.__name__
    # only the sum's gradient wanted: the norm output's is None
    for t in (x, r, w):
        t.grad = None
    keye.ops.add_rms_norm(x, r, w)[1].sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))
    assert w.grad is None or torch.all(w.grad == 0)


@pytest.mark.gpu
def test_kernel_argument_errors():
    x = torch.randn(3, 2, 96, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(96, device="cuda", dtype=torch.bfloat16)
    cos = torch.ones(3, 96, device="cuda")
    with pytest.raises(ValueError, match="head dim D must be 32, 64, 128 or 256"):
        torch.ops.keye.rms_norm_rope(x, w, cos, cos, 1e-6)
    with pytest.raises(ValueError, match="'weight' must have x's dtype bfloat16, got float32"):
        torch.ops.keye.rms_norm(x, w.float(), 1e-6)
    with pytest.raises(ValueError, match="'cos' must have dtype float32"):
        torch.ops.keye.rms_norm_rope(x[..., :64], w[:64], cos[:, :64].half(), cos[:, :64], 1e-6)
    with pytest.raises(ValueError, match="'residual' must have x's shape"):
        torch.ops.keye.add_rms_norm(x, x[:2], w, 1e-6)
    with pytest.raises(ValueError, match="'bias' must have x's dtype bfloat16, got float32"):
        torch.ops.keye.layer_norm_rope(x[..., :64], w[:64], w[:64].float(), cos[:, :64], cos[:, :64], 1e-6)
    with pytest.raises(ValueError, match="'eps' must be finite"):
        torch.ops.keye.rms_norm(x, w, float("nan"))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        torch.ops.keye.rms_norm(x, w.cpu(), 1e-6)
    # the op falls back to the reference where the kernel does not apply: D = 96, a float32 weight
    cs = torch.ones(3, 96, device="cuda")
    assert torch.equal(keye.ops.rms_norm_rope(x, w, cs, cs * 0), ref.rms_norm_rope(x, w, cs, cs * 0, 1e-6))
    assert keye.ops.rms_norm(x, w.float()).dtype == torch.float32
