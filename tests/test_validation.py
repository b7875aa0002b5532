"""Bad arguments raise ValueError naming the op and the argument, in the reference and (if built) the op layer."""

import pytest
import torch

import keye
from keye import ops
from keye.ops import reference as ref

ROUTE = (torch.zeros(4, 2, dtype=torch.int32), 8)


def _routing(T=4, K=2, E=8):
    return ref.moe_route(torch.randint(0, E, (T, K), dtype=torch.int32), E)


CASES = [
    ("moe_route", lambda f: f(torch.zeros(4, 2), 8), r"'topk_ids' must have dtype int32 or int64"),
    ("moe_route", lambda f: f(torch.zeros(8, dtype=torch.int32), 8), r"'topk_ids' must be 2-D"),
    ("moe_route", lambda f: f(*ROUTE[:1], 0), r"'num_experts' must be an int in \[1, 1024\]"),
    ("moe_route", lambda f: f(*ROUTE, align=0), r"'align' must be an int in \[1, 1024\]"),
    ("moe_route", lambda f: f(torch.tensor([[0, 8]], dtype=torch.int32), 8), r"'topk_ids' must hold values in \[-1, 7\]"),
    ("moe_route", lambda f: f(torch.tensor([[-2, 1]]), 8), r"'topk_ids' must hold values in \[-1, 7\], found values in \[-2, 1\]"),
    ("moe_permute", lambda f: f(torch.zeros(4, 8, dtype=torch.int32), *_routing()[:2]), r"'x' must have dtype bfloat16"),
    ("moe_permute", lambda f: f(torch.zeros(3, 8), *_routing()[:2]), r"'dest' has size 4 in dim 0 but num_tokens"),
    ("moe_permute", lambda f: f(torch.zeros(4, 8), _routing().dest.long(), _routing().src), r"'dest' must have dtype int32"),
    ("moe_permute", lambda f: f(torch.zeros(4, 8), _routing().dest, _routing().src[:5]), r"'src' has 5 rows but must have at least"),
    ("moe_permute", lambda f: f(torch.zeros(4, 8), _routing().dest + 100, _routing().src), r"'dest' must hold values in \[-1, 7\]"),
    ("moe_permute", lambda f: f(torch.zeros(4, 8), *_routing()[:2], torch.ones(4, 3)), r"'scale' must have the shape of 'dest'"),
    ("moe_unpermute", lambda f: f(torch.zeros(8, 4), _routing().dest, torch.ones(4, 2, dtype=torch.int64)), r"'weights' must have dtype"),
    ("moe_unpermute", lambda f: f(torch.zeros(5, 4), _routing().dest), r"'dest' must hold values in \[-1, 4\]"),
    ("moe_unpermute", lambda f: f(torch.zeros(8, 4), torch.zeros(4, 0, dtype=torch.int32)), r"top_k \(dest.size\(1\)\) must be in \[1, 256\]"),
]


@pytest.mark.parametrize("op,call,pattern", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("entry", ["reference", "public"])
def test_bad_arguments_are_named(op, call, pattern, entry):
    f = getattr(ref if entry == "reference" else ops, op)
    with pytest.raises(ValueError, match=f"keye.{op}: .*" + pattern):
        call(f)


def test_index_checks_can_be_disabled():
    bad = torch.tensor([[0, 9]], dtype=torch.int32)
    with ops.index_checks(False):
        r = ops.moe_route(bad, 8)  # out-of-range ids are then treated as unrouted, never read out of bounds
    assert r.dest.tolist() == [[0, -1]]
    with pytest.raises(ValueError):
        ops.moe_route(bad, 8)


def test_device_mismatch_is_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to mix devices")
    x = torch.zeros(4, 8, device="cuda")
    with pytest.raises(ValueError, match="'dest' is on cpu but 'x' is on cuda"):
        ops.moe_permute(x, *_routing()[:2])


@pytest.mark.gpu
@pytest.mark.parametrize("op,call,pattern", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_kernel_errors_name_the_argument(op, call, pattern):
    """The C++ checks (TORCH_CHECK_VALUE) say the same as the references for CUDA inputs."""
    kernel = getattr(torch.ops.keye, op)

    def on_cuda(*args, **kwargs):
        return kernel(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)

    with pytest.raises(ValueError, match=f"keye.{op}: .*" + pattern):
        call(on_cuda)


@pytest.mark.gpu
def test_kernel_rejects_cpu_tensor_mix():
    x = torch.zeros(4, 8, device="cuda")
    r = _routing()
    with pytest.raises(ValueError, match="'dest' must be a CUDA tensor|'dest' is on cpu"):
        torch.ops.keye.moe_permute(x, r.dest, r.src.cuda(), None)
    assert keye.kernels_available()
