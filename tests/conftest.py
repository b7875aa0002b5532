"""Shared test helpers: fresh random seeds, the gpu marker, dtype tolerances, poisoned allocations."""

import os

import pytest
import torch

import keye

# Relative tolerance of ||out - ref|| / ||ref|| per dtype (for results that involve rounding).
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output holds NaN/inf (unwritten or poisoned elements?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def gpu_ready() -> bool:
    return torch.cuda.is_available() and keye.kernels_available()


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device and keye's kernels; `cuda` tests only a CUDA device (video decoding, pixel
    preprocessing: no keye kernel involved)."""
    no_cuda = not torch.cuda.is_available()
    if not gpu_ready():
        why = "no CUDA device" if no_cuda else f"kernels unavailable: {keye.kernels_unavailable_reason()}"
        skip_gpu = pytest.mark.skip(reason=f"gpu test: {why}")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    if no_cuda:
        skip_cuda = pytest.mark.skip(reason="cuda test: no CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def fresh_seed():
    """A new seed per test (printed, so a failure can be replayed with KEYE_TEST_SEED=<seed>)."""
    seed = int(os.environ.get("KEYE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    print(f"KEYE_TEST_SEED={seed}")
    return seed


TEST_FRAME_ID = 151669  # test id for <|frame|> (absent from Qwen3's file; real id unverified)


@pytest.fixture(scope="session")
def qwen3_tokenizer():
    """KeyeTokenizer over the real Qwen3 tokenizer files (with TEST_FRAME_ID for <|frame|>); skips without them."""
    pytest.importorskip("tokenizers", reason="tokenizers not installed (pip install tokenizers)")
    from keye.processor import KeyeTokenizer, find_qwen3_tokenizer_dir

    try:
        path = find_qwen3_tokenizer_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real Qwen3 tokenizer unavailable: {e}")
    return KeyeTokenizer(path, {"<|frame|>": TEST_FRAME_ID})


def poison_next_alloc(nbytes: int, device="cuda", byte: int = 0xFF) -> None:
    """Fill a block of nbytes with `byte` and free it: the caching allocator hands that block to the next
    allocation of the same size, so elements a kernel fails to write keep the poison (0xFF.. is NaN for
    floats; use another byte for int outputs where -1 is a legal value)."""
    if nbytes == 0:
        return
    block = torch.empty(nbytes, dtype=torch.uint8, device=device)
    block.fill_(byte)
    del block
