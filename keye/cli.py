"""Command line: `keye bench` (microbenchmarks + self-check) and `keye info`."""

from __future__ import annotations

import argparse
import sys


def _info(_args) -> int:
    import torch

    import keye

    print(f"keye {keye.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"kernels: {'available' if keye.kernels_available() else 'unavailable: ' + str(keye.kernels_unavailable_reason())}")
    print(f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keye", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="kernel microbenchmarks, each checked against its reference first")
    bench.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")],
                       help="comma-separated token counts (default: 4096,16384,65536 on GPU; 1024,4096 on CPU; "
                            "the dsa suite's prefill 8192,32768,65536,131072)")
    bench.add_argument("--reps", type=int, help="timed runs per measurement (median is reported)")
    bench.add_argument("--json", help="also write the full report as JSON to this path")
    bench.add_argument("--suite", choices=("all", "moe", "norm", "dsa", "attn", "gemm"), default="all",
                       help="which kernels: MoE routing/permutation, the RMSNorms (+ RoPE), the DSA indexer, sparse attention or the MoE "
                            "grouped GEMMs and layer (the last three GPU only), or all")
    sub.add_parser("info", help="versions and whether the CUDA kernels are available")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from keye.bench import main as bench_main

        return bench_main(args)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
