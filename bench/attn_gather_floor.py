"""Data-movement floors of top-k sparse attention on pattern (a) against issue 4's targets, in one process.

For the realistic index pattern (keye.bench.sparse_attention.realistic_indices: window 512, anchors 1024 shared by a
256-query region, random tail 512) this times kernels that only move K/V bytes (bench/attn_gather_floor.cu) over
the row lists a design must gather, beside keye's forward / backward and cuDNN SDPA / flash backward on the same
inputs:
  per query     every query gathers its own 2048 rows (no sharing: the per-query port)
  keye plan     what keye's block kernels gather: per 16-query block its common rows once and every query's other
                rows (torch.ops.keye.sparse_attention_block_plan, the forward's own plan)
  union B       per block of B queries every distinct row once (the most any design sharing rows within B-query
                blocks can save)
Each list is gathered for all 4 KV heads (512 B of K and V per row and head), by one CTA per (list, KV head) or per
(list, 4 KV heads: whole 1 KB token rows). The backward floor adds the dK / dV fp32 atomics (1 KB per row and head)
of a query-major backward to the keye-plan gather. Every gather's word sums are checked against torch first.

    python3 bench/attn_gather_floor.py [--tokens 32768,131072] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keye import ops  # noqa: E402
from keye.bench.sparse_attention import (HEAD_DIM, KV_HEADS, Q_HEADS, TOPK, flash_backward_ms,  # noqa: E402
                                         realistic_indices, sdpa_forward_ms)
from keye.bench.timing import median_ms  # noqa: E402

ROW_MASK = (1 << 29) - 1  # work-list entry -> row (csrc/sparse_attention/work_list.cuh)
FWD_TARGETS = {32768: 3, 131072: 12}  # issue 4: forward at least this many times faster than cuDNN SDPA
BWD_TARGETS = {32768: 3}              # ... and the backward than flash backward
ROW_BYTES = 2 * HEAD_DIM * 2  # K and V of one row and KV head, bf16


def build_library() -> ctypes.CDLL:
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        raise RuntimeError("attn_gather_floor: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    out = Path(tempfile.gettempdir()) / "keye_attn_gather_floor.so"
    subprocess.run([nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler",
                    "-fPIC", str(ROOT / "bench" / "attn_gather_floor.cu"), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.keye_gather_floor.restype = ctypes.c_int
    lib.keye_gather_floor.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4
    return lib


class Lists:
    """Row lists end to end: rows int32 [n], offsets int64 [lists + 1]."""

    def __init__(self, rows: torch.Tensor, counts: torch.Tensor):
        self.rows = rows.int().contiguous()
        self.offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(counts, 0, out=self.offsets[1:])
        self.n = int(self.offsets[-1])
        if self.n != self.rows.numel():
            raise RuntimeError(f"attn_gather_floor: {self.rows.numel()} rows but counts sum to {self.n}")

    @property
    def lists(self) -> int:
        return self.offsets.numel() - 1


def per_query_lists(idx: torch.Tensor) -> Lists:
    valid = idx >= 0
    return Lists(idx[valid], valid.sum(1))


def union_lists(idx: torch.Tensor, block: int) -> Lists:
    pad = (-idx.shape[0]) % block
    x = torch.cat([idx, idx.new_full((pad, idx.shape[1]), -1)]).view(-1, block * idx.shape[1])
    x = x.sort(dim=1).values
    keep = x >= 0
    keep[:, 1:] &= x[:, 1:] != x[:, :-1]
    return Lists(x[keep], keep.sum(1))


def plan_lists(idx: torch.Tensor, num_rows: int) -> Lists:
    common, common_len, pair_work, pair_len = torch.ops.keye.sparse_attention_block_plan(idx, None, num_rows)
    blocks = common.shape[0]
    if pair_work.shape[0] != 8 * blocks:
        raise RuntimeError(f"attn_gather_floor: expected 8 pairs per block, got {pair_work.shape[0]} for {blocks}")
    dev = idx.device
    cmask = torch.arange(common.shape[1], device=dev)[None] < common_len[:, None]
    pmask = (torch.arange(pair_work.shape[1], device=dev)[None] < pair_len[:, None]) & (pair_work >= 0)
    entries = torch.cat([common, pair_work.view(blocks, -1)], 1)
    mask = torch.cat([cmask, pmask.view(blocks, -1)], 1)
    return Lists(entries[mask] & ROW_MASK, mask.sum(1))


class Floor:
    def __init__(self, lib: ctypes.CDLL, k: torch.Tensor, v: torch.Tensor):
        self.lib, self.k, self.v = lib, k, v
        self.dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        self.dv = torch.zeros_like(self.dk)

    def run(self, lists: Lists, heads_per_cta: int = 1, scatter: bool = False) -> torch.Tensor:
        sums = torch.empty(lists.lists, KV_HEADS // heads_per_cta, dtype=torch.int32, device=self.k.device)
        err = self.lib.keye_gather_floor(self.k.data_ptr(), self.v.data_ptr(), lists.rows.data_ptr(),
                                         lists.offsets.data_ptr(), lists.lists, KV_HEADS, heads_per_cta, int(scatter),
                                         self.dk.data_ptr(), self.dv.data_ptr(), sums.data_ptr(),
                                         torch.cuda.current_stream().cuda_stream)
        if err != 0:
            raise RuntimeError(f"attn_gather_floor: launch failed with code {err}")
        return sums

    def expected_sums(self, lists: Lists, heads_per_cta: int) -> torch.Tensor:
        """Per (list, head group) the 32-bit wrapping sum of the gathered words, computed by torch."""
        words = (self.k.view(torch.int32).view(self.k.shape[0], KV_HEADS, -1).long().sum(2)
                 + self.v.view(torch.int32).view(self.v.shape[0], KV_HEADS, -1).long().sum(2))
        per_row = words.view(-1, KV_HEADS // heads_per_cta, heads_per_cta).sum(2)[lists.rows.long()]
        owner = torch.repeat_interleave(torch.arange(lists.lists, device=self.k.device),
                                        lists.offsets.diff())
        out = torch.zeros(lists.lists, KV_HEADS // heads_per_cta, dtype=torch.int64, device=self.k.device)
        out.index_add_(0, owner, per_row)
        return (((out + 2**31) & 0xFFFFFFFF) - 2**31).int()  # wrapped to 32 bits, as the kernel's uint32 sums

    def check(self, lists: Lists) -> None:
        for hpc in (1, 4):
            got = self.run(lists, hpc)
            want = self.expected_sums(lists, hpc)
            if not torch.equal(got, want):
                bad = int((got != want).sum())
                raise RuntimeError(f"attn_gather_floor: {bad} of {got.numel()} gather sums wrong (heads_per_cta {hpc})")
        self.dk.zero_()
        self.dv.zero_()
        self.run(lists, 1, scatter=True)
        for got, src in ((self.dk, self.k), (self.dv, self.v)):
            rows = lists.rows.long()
            want = torch.zeros_like(got).index_add_(0, rows, src.float()[rows])
            err = ((got - want).norm() / want.norm()).item()
            if err > 1e-5:
                raise RuntimeError(f"attn_gather_floor: scattered dK/dV off by {err:.2e} (relative norm)")


def case(lib: ctypes.CDLL, T: int, reps: int) -> dict:
    dev = torch.device("cuda")
    q = torch.randn(T, Q_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(T, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
    cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
    idx = realistic_indices(T, TOPK, dev)
    long_run = T >= 65536
    r = max(3, reps // 4) if long_run else reps
    rec: dict = {"tokens": T, "sdpa_fwd_ms": sdpa_forward_ms(q, k, v, dev, r)}
    with ops.index_checks(False):
        rec["keye_fwd_ms"] = median_ms(lambda: ops.sparse_attention(q, k, v, idx, cu), dev, r, 2)
        if not long_run:
            rec["flash_bwd_ms"] = flash_backward_ms(q, k, v, dev, r)
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            o, _ = ops.sparse_attention(qg, kg, vg, idx, cu)
            do = torch.randn_like(o)
            rec["keye_bwd_ms"] = median_ms(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True),
                                           dev, 5, 1)
            del qg, kg, vg, o, do
    del q
    floor = Floor(lib, k, v)
    sets = {"per query": per_query_lists(idx), "keye plan": plan_lists(idx, T), "union 16": union_lists(idx, 16),
            "union 64": union_lists(idx, 64), "union 256": union_lists(idx, 256)}
    del idx
    floors = {}
    for name, lists in sets.items():
        f = {"rows_M": lists.n / 1e6, "GB": lists.n * KV_HEADS * ROW_BYTES / 1e9}
        fr = 3 if name == "per query" and long_run else r
        for hpc in (1, 4):
            f[f"ms_{hpc}h"] = median_ms(lambda: floor.run(lists, hpc), dev, fr, 1)
        floors[name] = f
        if name != "per query" or not long_run:
            f["bwd_ms"] = median_ms(lambda: floor.run(lists, 1, scatter=True), dev, fr, 1)
    rec["floors"] = floors
    return rec


def report(recs: list[dict]) -> str:
    """The records as text; floor ratios against issue 4's targets where the issue sets one for that length."""
    lines = []
    for rec in recs:
        T, ratio = rec["tokens"], FWD_TARGETS.get(rec["tokens"])
        fwd_target = rec["sdpa_fwd_ms"] / ratio if ratio else None
        target_text = f"target {fwd_target:.2f} ms ({ratio}x)" if ratio else "no target at this length"
        lines.append(f"T = {T}: cuDNN SDPA fwd {rec['sdpa_fwd_ms']:.2f} ms -> {target_text}; "
                     f"keye fwd {rec['keye_fwd_ms']:.2f} ms")
        lines.append(f"  {'rows of':<10} {'M rows':>8} {'GB':>7} {'1 head/CTA ms':>14} {'4 heads/CTA ms':>15} "
                     f"{'best GB/s':>9} {'best / target':>13}")
        for name, f in rec["floors"].items():
            best = min(f["ms_1h"], f["ms_4h"])
            vs_target = f"{best / fwd_target:>13.2f}" if fwd_target else f"{'-':>13}"
            lines.append(f"  {name:<10} {f['rows_M']:>8.1f} {f['GB']:>7.1f} {f['ms_1h']:>14.2f} {f['ms_4h']:>15.2f} "
                         f"{f['GB'] / best * 1e3:>9.0f} {vs_target}")
        if "flash_bwd_ms" in rec:
            ratio = BWD_TARGETS.get(T)
            bwd_target = rec["flash_bwd_ms"] / ratio if ratio else None
            target_text = f"target {bwd_target:.2f} ms ({ratio}x)" if ratio else "no target at this length"
            lines.append(f"  backward: flash {rec['flash_bwd_ms']:.2f} ms -> {target_text}; keye "
                         f"{rec['keye_bwd_ms']:.2f} ms; gather + dK/dV fp32 atomics alone, ms"
                         + (" (x target):" if ratio else ":"))
            lines.append("   " + "; ".join(f"{name} {f['bwd_ms']:.2f}"
                                           + (f" ({f['bwd_ms'] / bwd_target:.2f})" if ratio else "")
                                           for name, f in rec["floors"].items() if "bwd_ms" in f))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="32768,131072", help="comma-separated sequence lengths")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attn_gather_floor: needs a CUDA GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    if any(t <= TOPK for t in tokens):
        raise SystemExit(f"attn_gather_floor: every length must exceed k = {TOPK}")
    lib = build_library()
    dev = torch.device("cuda")
    small = 3000  # the checks: every list set's sums and the scatter against torch
    k, v = (torch.randn(small, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16) for _ in range(2))
    idx = realistic_indices(small, TOPK, dev)
    floor = Floor(lib, k, v)
    for lists in (per_query_lists(idx), plan_lists(idx, small), union_lists(idx, 16), union_lists(idx, 64)):
        floor.check(lists)
    print("checks passed: gather sums and dK/dV scatter equal torch's", flush=True)
    recs = []
    for T in tokens:
        recs.append(case(lib, T, args.reps))
        print(report(recs[-1:]), flush=True)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=1))


if __name__ == "__main__":
    main()
