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
