"""Build variants of one csrc/ CUDA file as small extensions, to A/B kernel variants in one process on the GPU.

A full build of keye's extension takes ~2 min of device time; one file of it, compiled alone, ~40 s, and several
variants compile in parallel. Each variant is a copy of a csrc/ .cu file (edited by you), compiled with the C++
namespace `keye` renamed (-Dkeye=keye_<tag>) so that any number of variants and the installed keye extension live in
one process without symbol clashes, and bound by pybind11 to the host functions you name:

    sys.path.insert(0, "bench"); from kernel_variants import build_variants
    decl = ("at::Tensor moe_decode_cuda(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, "
            "const at::Tensor& gate_up, const at::Tensor& down)")
    mods = build_variants({"a": "/tmp/decode_fused_a.cu", "b": "/tmp/decode_fused_b.cu"}, [decl])
    out = mods["a"].moe_decode(x, ids, weights, w1, w2)      # the function's name without the _cuda suffix

The variants call the launchers directly (no torch.ops dispatch, no keye.ops argument layer), and their index checks
are their own copy of csrc/common/index_checks.cpp: set KEYE_INDEX_CHECKS=0 in the environment before the first call
to capture them in CUDA graphs. torch.utils.cpp_extension builds them: set CUDA_HOME if it does not find the toolkit
(its headers are needed by the C++ files too). Twelfth session (NOTES.md, issue 5): the fused decode kernel's variants.

    python3 bench/kernel_variants.py a=/tmp/decode_fused_a.cu b=/tmp/decode_fused_b.cu --decl "<declaration>"
builds them in parallel (one process each) and exits; build_variants() in the timing script then only loads them.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_DECL = re.compile(r"^\s*(?P<ret>[\w:<>]+)\s+(?P<name>\w+)\s*\((?P<args>.*)\)\s*;?\s*$", re.S)


def _binding(tag: str, decls: list[str]) -> str:
    lines = ["#include <torch/extension.h>", "namespace keye {"]
    defs = []
    for decl in decls:
        m = _DECL.match(decl)
        if m is None:
            raise ValueError(f"kernel_variants: cannot read the C++ declaration {decl!r} "
                             "(expected 'return_type name(arguments)')")
        lines.append(decl.rstrip().rstrip(";") + ";")
        py_name = m["name"].removesuffix("_cuda")
        defs.append(f'  m.def("{py_name}", &keye::{m["name"]});')
    lines += ["}  // namespace keye", "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {", *defs, "}", ""]
    return "\n".join(lines)


def build_variant(tag: str, source: str | os.PathLike, decls: list[str], verbose: bool = False):
    """Compile `source` (a variant of a csrc/ .cu file) into the module keye_variant_<tag> and import it."""
    from torch.utils.cpp_extension import load

    if not re.fullmatch(r"[A-Za-z0-9_]+", tag):
        raise ValueError(f"kernel_variants: tag must be letters, digits or _, got {tag!r}")
    source = Path(source).resolve()
    if not source.is_file():
        raise FileNotFoundError(f"kernel_variants: no source file {source}")
    build_dir = Path(os.environ.get("KEYE_VARIANT_BUILD", "/tmp/keye_variants")) / tag
    build_dir.mkdir(parents=True, exist_ok=True)
    bind = build_dir / "bind.cpp"
    text = _binding(tag, decls)
    if not bind.exists() or bind.read_text() != text:  # rewritten only on change: ninja then skips a rebuild
        bind.write_text(text)
    flags = [f"-Dkeye=keye_{tag}", "-O3", "-std=c++20"]
    return load(name=f"keye_variant_{tag}", sources=[str(bind), str(source), str(ROOT / "csrc/common/index_checks.cpp")],
                extra_include_paths=[str(ROOT / "csrc")], extra_cflags=flags,
                extra_cuda_cflags=flags + ["-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
                                           "--expt-extended-lambda"],
                build_directory=str(build_dir), verbose=verbose)


def build_variants(sources: dict[str, str | os.PathLike], decls: list[str]) -> dict:
    """Variants tag -> module; each compiled in its own process first (in parallel), then loaded here."""
    procs = {tag: subprocess.Popen([sys.executable, __file__, f"{tag}={src}", *sum((["--decl", d] for d in decls), [])])
             for tag, src in sources.items()}
    failed = [tag for tag, p in procs.items() if p.wait() != 0]
    if failed:
        raise RuntimeError(f"kernel_variants: building {', '.join(failed)} failed (output above)")
    return {tag: build_variant(tag, src, decls) for tag, src in sources.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", help="tag=path/to/variant.cu")
    p.add_argument("--decl", action="append", required=True, help="a host function to bind (C++ declaration)")
    a = p.parse_args()
    pairs = [v.split("=", 1) for v in a.variants]
    if any(len(pair) != 2 for pair in pairs):
        p.error("variants are tag=path pairs")
    if len(pairs) == 1:
        build_variant(pairs[0][0], pairs[0][1], a.decl)
    else:
        build_variants(dict(pairs), a.decl)


if __name__ == "__main__":
    main()
