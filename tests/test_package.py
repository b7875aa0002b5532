"""Package plumbing: extension loading, the kernel/reference switch, the CLI."""

import os

import pytest
import torch

import keye
from keye import ops
from keye.ops import _dispatch


def test_kernels_present_where_required():
    """CI and the GPU script set KEYE_REQUIRE_KERNELS=1: there a missing or unloadable extension fails."""
    if os.environ.get("KEYE_REQUIRE_KERNELS") != "1":
        pytest.skip("KEYE_REQUIRE_KERNELS not set")
    assert keye.kernels_available(), keye.kernels_unavailable_reason()
    for name in ("moe_route", "moe_permute", "moe_unpermute"):
        assert hasattr(torch.ops.keye, name)


def test_force_reference_context_and_env(monkeypatch):
    monkeypatch.setattr(_dispatch, "kernels_available", lambda: True)
    cuda_like = type("T", (), {"is_cuda": True})()
    assert _dispatch.use_kernel(cuda_like, None)
    with ops.force_reference():
        assert not _dispatch.use_kernel(cuda_like)
        with ops.force_reference():
            assert not _dispatch.use_kernel(cuda_like)
        assert not _dispatch.use_kernel(cuda_like)
    assert _dispatch.use_kernel(cuda_like)
    monkeypatch.setenv("KEYE_FORCE_REFERENCE", "1")
    assert not _dispatch.use_kernel(cuda_like)


def test_cpu_tensors_use_reference(monkeypatch):
    called = []
    monkeypatch.setattr(ops.moe_permute.__globals__["ref"], "moe_route",
                        lambda *a: called.append(a) or "reference")
    assert ops.moe_route(torch.zeros(2, 2, dtype=torch.int32), 4) == "reference" and called


@pytest.mark.skipif(not keye.kernels_available(), reason="extension not built")
def test_cpu_op_registration_passes_opcheck():
    """torch.ops.keye.* on CPU run the references; opcheck validates schema, fake impl and autograd."""
    ids = torch.randint(-1, 8, (16, 4), dtype=torch.int32)
    r = ops.moe_route(ids, 8, 4)
    x = torch.randn(16, 32, requires_grad=True)
    y = torch.randn(r.src.numel(), 32, requires_grad=True)
    w = torch.rand(16, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.keye.moe_route.default, (ids, 8, 4))
    torch.library.opcheck(torch.ops.keye.moe_permute.default, (x, r.dest, r.src, w))
    torch.library.opcheck(torch.ops.keye.moe_unpermute.default, (y, r.dest, w))
    torch.library.opcheck(torch.ops.keye.moe_slot_dot.default, (y.detach(), r.dest, x.detach()))
    h, d = torch.randn(16, 32), torch.randn(16, 16)
    torch.library.opcheck(torch.ops.keye.moe_swiglu_backward.default, (h, d, torch.empty(16, 16)))
    off = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    torch.library.opcheck(torch.ops.keye.moe_grouped_mm_swiglu.default,
                          (torch.randn(16, 8), ops.moe_pack_gate_up(torch.randn(3, 8, 256)), off))


@pytest.mark.skipif(not keye.kernels_available(), reason="extension not built")
def test_registered_backward_equals_reference_autograd():
    """The autograd formulas registered for the kernels, exercised through the CPU registration."""
    T, K, E, H = 40, 4, 8, 16
    r = ops.moe_route(torch.randint(-1, E, (T, K), dtype=torch.int32), E, 4)
    x0, s0, w0, g = torch.randn(T, H), torch.rand(T, K), torch.rand(T, K), torch.randn(T, H)
    grads = []
    for fns in ((torch.ops.keye.moe_permute, torch.ops.keye.moe_unpermute),
                (ops.reference.moe_permute, ops.reference.moe_unpermute)):
        x, s, w = (t.clone().requires_grad_() for t in (x0, s0, w0))
        out = fns[1](torch.tanh(fns[0](x, r.dest, r.src, s)), r.dest, w)
        (out * g).sum().backward()
        grads.append((x.grad, s.grad, w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_src_from_dest_inverts_route():
    r = ops.reference.moe_route(torch.randint(-1, 16, (100, 8), dtype=torch.int32), 16, 8)
    assert torch.equal(ops.src_from_dest(r.dest, r.src.numel()), r.src)


def test_cli_bench_runs_and_self_checks(tmp_path, capsys):
    from keye.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--suite", "moe", "--tokens", "64", "--reps", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "moe_permute" in text and "FAIL" not in text
    import json

    report = json.loads(out.read_text())
    assert {r["op"] for r in report["results"]} == {"moe_router", "moe_route", "moe_permute", "moe_unpermute"}
    assert all(r["check"] == "ok" for r in report["results"])


def test_missing_kernels_are_announced_once():
    """Without the extension keye warns once, clearly, and the ops still run (on the references)."""
    import subprocess
    import sys

    code = ("import warnings, torch, keye; warnings.simplefilter('always');"
            "from keye import ops;"
            "r = ops.moe_route(torch.zeros(3, 2, dtype=torch.int32), 4);"
            "keye.kernels_available(); keye.kernels_available();"
            "print(r.offsets.tolist())")
    env = dict(os.environ, KEYE_DISABLE_KERNELS="1")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[0, 6, 6, 6, 6]"
    assert p.stderr.count("keye: CUDA kernels are unavailable (disabled by KEYE_DISABLE_KERNELS)") == 1, p.stderr
