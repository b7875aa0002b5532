"""keye.bench.timing.kernel_ms: the kernels' own durations from the profiler, per call."""
import pytest
import torch

from keye.bench.timing import capture_graph, kernel_ms, median_ms

CUDA = torch.cuda.is_available()


def test_kernel_ms_needs_a_cuda_device():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernel_ms(lambda: None, torch.device("cpu"))


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_kernel_ms_sums_each_calls_kernels_and_leaves_out_the_launch():
    dev = torch.device("cuda")
    src = torch.randint(0, 255, (256 << 20,), dtype=torch.uint8, device=dev)
    dst, dst2 = torch.empty_like(src), torch.empty_like(src)
    one = kernel_ms(lambda: dst.copy_(src), dev, reps=10)
    two = kernel_ms(lambda: (dst.copy_(src), dst2.copy_(src)), dev, reps=10)
    assert 1.7 < two / one < 2.3  # both copies of a call are counted, once each
    # A 512 MB copy takes ~0.13 ms, its launch a few us: the kernel record is most of the event-timed call, not all.
    event = median_ms(lambda: dst.copy_(src), dev, reps=10)
    assert 0.8 * event <= one <= 1.05 * event
    # A graph of one tiny kernel: the event pair around a replay includes the graph launch, the kernel record not.
    x = torch.zeros(1, device=dev)
    g = capture_graph(lambda: x.add_(1))
    assert kernel_ms(g.replay, dev, reps=20) < median_ms(g.replay, dev, reps=20)
    # Only the kernels named like `match` count; a name that matches none is an error, not 0 ms.
    assert kernel_ms(lambda: (dst.copy_(src), x.add_(1)), dev, match="add", reps=5) < 0.2 * one
    with pytest.raises(RuntimeError, match="no kernel"):
        kernel_ms(lambda: dst.copy_(src), dev, match="no_such_kernel_name", reps=3)
