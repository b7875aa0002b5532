"""`keye bench`: kernel microbenchmarks with a correctness self-check against the references."""

from __future__ import annotations

import json
import platform

import torch

import keye
from keye import ops
from keye.bench import dsa_indexer, moe_gemm, moe_permute, moe_router, norm, sparse_attention
from keye.bench.timing import copy_bandwidth_gbs, gemm_tflops, write_bandwidth_gbs


def environment(device: torch.device) -> dict:
    env = {"keye": keye.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "kernels": keye.kernels_available(), "kernels_reason": keye.kernels_unavailable_reason(),
           "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda)
    return env


def run(tokens: list[int], reps: int, device: torch.device, suites=("moe",), attn_tokens=None) -> dict:
    report = {"environment": environment(device), "ceilings": {}, "results": []}
    if device.type == "cuda":
        report["ceilings"] = {"copy_GBps": copy_bandwidth_gbs(device), "write_GBps": write_bandwidth_gbs(device),
                              "bf16_gemm_TFLOPs": gemm_tflops(device)}
    on_gpu = device.type == "cuda" and ops.use_kernel(torch.empty(0, device=device))
    if "moe" in suites:
        for T in tokens:
            report["results"] += moe_router.run_case(T, device, reps, on_gpu)
            report["results"] += moe_permute.run_case(T, device, reps, on_gpu)
    if "norm" in suites:
        for T in sorted({1, 16, *tokens}):  # decode batches too: there the norms are launch-bound
            report["results"] += norm.run_case(T, device, reps, on_gpu)
    if "dsa" in suites and on_gpu:  # FP8 kernels only; the references run in the tests instead
        report["dsa_indexer"] = dsa_indexer.run(device, reps, **({"tokens": attn_tokens} if attn_tokens else {}))
    if "attn" in suites and on_gpu:
        report["sparse_attention"] = sparse_attention.run(device, reps, attn_tokens)
    if "gemm" in suites and on_gpu:
        report["moe_gemm"] = moe_gemm.run(device, reps, attn_tokens)
    _derive(report)
    return report


def _derive(report: dict) -> None:
    copy = report["ceilings"].get("copy_GBps")
    for r in report["results"]:
        best = r.get("kernel_ms", r["reference_ms"])
        r["GBps"] = r["bytes"] / best / 1e6
        if copy:
            r["copy_fraction"] = r["GBps"] / copy
        if "kernel_ms" in r:
            r["speedup_vs_reference"] = r["reference_ms"] / r["kernel_ms"]
            if "baseline_ms" in r:
                r["speedup_vs_baseline"] = r["baseline_ms"] / r["kernel_ms"]


def _kernel_state(env: dict) -> str:
    if not env["kernels"]:
        return f"no ({env['kernels_reason']}); timing the references"
    return "yes" if env["device"].startswith("cuda") else "built, but no CUDA device; timing the references"


def table(report: dict) -> str:
    env, ceil = report["environment"], report["ceilings"]
    lines = [f"keye {env['keye']}  torch {env['torch']}  {env.get('gpu', env['device'])}  "
             f"kernels: {_kernel_state(env)}"]
    if ceil:
        lines.append(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read+write), write-only {ceil['write_GBps']:.0f} GB/s, "
                     f"bf16 GEMM {ceil['bf16_gemm_TFLOPs']:.0f} TFLOP/s")
    head = f"{'op':<16}{'tokens':>7} {'check':>5} {'kernel ms':>10} {'ref ms':>9} {'base ms':>9} " \
           f"{'x ref':>7} {'x base':>7} {'GB/s':>7} {'% copy':>7}"
    if report["results"]:
        lines += [head, "-" * len(head)]
    for r in report["results"]:
        f = lambda k, fmt: format(r[k], fmt) if k in r else "-"
        pct = f"{100 * r['copy_fraction']:.0f}%" if "copy_fraction" in r else "-"
        lines.append(f"{r['op']:<16}{r['tokens']:>7} {r['check']:>5} {f('kernel_ms', '.4f'):>10} "
                     f"{f('reference_ms', '.4f'):>9} {f('baseline_ms', '.4f'):>9} "
                     f"{f('speedup_vs_reference', '.2f'):>7} {f('speedup_vs_baseline', '.2f'):>7} "
                     f"{r['GBps']:>7.0f} {pct:>7}")
    if "dsa_indexer" in report:
        lines.append(dsa_indexer.table(report["dsa_indexer"], ceil["copy_GBps"]))
    if "sparse_attention" in report:
        lines.append(sparse_attention.table(report["sparse_attention"], ceil["copy_GBps"]))
    if "moe_gemm" in report:
        lines.append(moe_gemm.table(report["moe_gemm"], ceil["copy_GBps"]))
    return "\n".join(lines)


def main(args) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokens = args.tokens or ([4096, 16384, 65536] if device.type == "cuda" else [1024, 4096])
    reps = args.reps or (50 if device.type == "cuda" else 5)
    suites = ("moe", "norm", "dsa", "attn", "gemm") if args.suite == "all" else (args.suite,)
    report = run(tokens, reps, device, suites, attn_tokens=args.tokens)
    text = table(report)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    records = report["results"] + report.get("dsa_indexer", {}).get("results", [])
    records += report.get("sparse_attention", {}).get("results", [])
    records += report.get("moe_gemm", {}).get("gemm", []) + report.get("moe_gemm", {}).get("layer", [])
    failed = [r for r in records if r["check"] != "ok"]
    if failed:
        print(f"SELF-CHECK FAILED: {[(r.get('op', r.get('gemm', r.get('shape'))), r.get('tokens', r.get('batch'))) for r in failed]}")
    return 1 if failed else 0
