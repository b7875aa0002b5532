"""bench/kernel_variants.py: the binding it writes for a variant and its argument errors (no compiler needed)."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "kernel_variants.py"
_spec = importlib.util.spec_from_file_location("kernel_variants", _PATH)
kv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kv)

DECL = ("at::Tensor moe_decode_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, "
        "const at::Tensor& gate_up, const at::Tensor& down)")


def test_binding_declares_and_binds_each_function_without_the_cuda_suffix():
    src = kv._binding("a", [DECL, "void topk_rows_cuda(const at::Tensor& s, int64_t k);"])
    assert "namespace keye {" in src and "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)" in src
    assert DECL + ";" in src and "void topk_rows_cuda(const at::Tensor& s, int64_t k);" in src
    assert 'm.def("moe_decode", &keye::moe_decode_cuda);' in src
    assert 'm.def("topk_rows", &keye::topk_rows_cuda);' in src
    assert src.count("m.def(") == 2


def test_bad_declaration_tag_and_source_are_reported():
    with pytest.raises(ValueError, match="cannot read the C\\+\\+ declaration"):
        kv._binding("a", ["moe_decode_cuda"])
    with pytest.raises(ValueError, match="tag must be letters"):
        kv.build_variant("a-b", _PATH, [DECL])
    with pytest.raises(FileNotFoundError, match="no source file"):
        kv.build_variant("a", _PATH.parent / "no_such_variant.cu", [DECL])


_FLOOR_PATH = _PATH.parent / "attn_gather_floor.py"
_fspec = importlib.util.spec_from_file_location("attn_gather_floor", _FLOOR_PATH)
agf = importlib.util.module_from_spec(_fspec)
_fspec.loader.exec_module(agf)


def test_gather_floor_lists_match_their_definitions():
    """bench/attn_gather_floor.py's row lists on realistic indices: per query its valid entries in slot order; per
    block of B queries (the last block short) every distinct row once, ascending."""
    import torch

    from keye.bench.sparse_attention import realistic_indices

    torch.manual_seed(0)
    T, K = 2100 + 37, 2048
    idx = realistic_indices(T, K, "cpu")
    idx[5, 3:] = -1  # a short list
    per_query = agf.per_query_lists(idx)
    assert per_query.lists == T and per_query.n == int((idx >= 0).sum())
    for q in (0, 5, 2048, T - 1):
        got = per_query.rows[per_query.offsets[q]:per_query.offsets[q + 1]].tolist()
        assert got == [r for r in idx[q].tolist() if r >= 0], q
    for B in (16, 64):
        union = agf.union_lists(idx, B)
        assert union.lists == (T + B - 1) // B
        for b in range(union.lists):
            block = idx[B * b:B * (b + 1)]
            want = sorted(set(block[block >= 0].tolist()))
            assert union.rows[union.offsets[b]:union.offsets[b + 1]].tolist() == want, (B, b)


def test_gather_floor_lists_reject_inconsistent_counts():
    import torch

    with pytest.raises(RuntimeError, match="3 rows but counts sum to 4"):
        agf.Lists(torch.arange(3), torch.tensor([1, 3]))
