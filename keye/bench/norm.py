"""Microbenchmark of the language model's norms on Keye shapes (hidden 2048; 32 query heads of 128), bf16.

  kernel     torch.ops.keye.rms_norm / add_rms_norm / rms_norm_rope / layer_norm_rope (the indexer key, 1 x 64)
  reference  keye.ops.reference.norm: the eager PyTorch modules the model ran before (~7 kernels per norm)
  baseline   torch.nn.functional.rms_norm (PyTorch's own fused norm; rms_norm and add_rms_norm's norm only; it
             rounds once, not twice, so it is a speed baseline, not the specification)

bytes: what each op must read and write (x, residual, weight, cos / sin, outputs), against the copy ceiling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from keye.bench.timing import median_ms, rel_err
from keye.model.rope import mrope_cos_sin
from keye.ops import reference as ref

HIDDEN, HEADS, HEAD_DIM, INDEX_DIM, EPS = 2048, 32, 128, 64, 1e-6


def _record(op, T, check, nbytes, reference, kernel, baseline, device, reps, on_gpu) -> dict:
    rec = {"op": op, "tokens": T, "dtype": "bfloat16", "bytes": nbytes, "check": "ok" if check else "FAIL",
           "reference_ms": median_ms(reference, device, reps)}
    if baseline is not None:
        rec["baseline_ms"] = median_ms(baseline, device, reps)
    if on_gpu:
        rec["kernel_ms"] = median_ms(kernel, device, reps)
    return rec


def run_case(T: int, device: torch.device, reps: int, on_gpu: bool) -> list[dict]:
    bf = dict(device=device, dtype=torch.bfloat16)
    x, res, w = torch.randn(T, HIDDEN, **bf), torch.randn(T, HIDDEN, **bf) * 4, torch.randn(HIDDEN, **bf)
    q, qw = torch.randn(T, HEADS, HEAD_DIM, **bf), torch.randn(HEAD_DIM, **bf)
    k, kw, kb = torch.randn(T, 1, INDEX_DIM, **bf), torch.randn(INDEX_DIM, **bf), torch.randn(INDEX_DIM, **bf)
    pos = torch.arange(T).expand(3, -1)
    cos, sin = (t.to(device) for t in mrope_cos_sin(pos, HEAD_DIM, 1e6, [16, 24, 24]))
    icos, isin = (t.to(device) for t in mrope_cos_sin(pos, INDEX_DIM, 1e6, [8, 12, 12]))
    row = T * HIDDEN * 2

    def ok(got, want):  # the kernels may differ from the reference only by the mean's summation order
        return all(rel_err(g, r) < 4e-3 for g, r in zip(got, want))

    kern = torch.ops.keye if on_gpu else None
    out = []
    want = ref.rms_norm(x, w, EPS)
    got = kern.rms_norm(x, w, EPS) if on_gpu else want
    out.append(_record("rms_norm", T, ok([got], [want]), 2 * row + HIDDEN * 2, lambda: ref.rms_norm(x, w, EPS),
                       lambda: kern.rms_norm(x, w, EPS), lambda: F.rms_norm(x, (HIDDEN,), w, EPS), device, reps,
                       on_gpu))
    want = ref.add_rms_norm(x, res, w, EPS)
    got = kern.add_rms_norm(x, res, w, EPS) if on_gpu else want
    out.append(_record("add_rms_norm", T, ok(got, want), 4 * row + HIDDEN * 2,
                       lambda: ref.add_rms_norm(x, res, w, EPS), lambda: kern.add_rms_norm(x, res, w, EPS),
                       lambda: F.rms_norm(x + res, (HIDDEN,), w, EPS), device, reps, on_gpu))
    want = ref.rms_norm_rope(q, qw, cos, sin, EPS)
    got = kern.rms_norm_rope(q, qw, cos, sin, EPS) if on_gpu else want
    out.append(_record("rms_norm_rope", T, ok([got], [want]), 2 * q.numel() * 2 + 2 * cos.numel() * 4,
                       lambda: ref.rms_norm_rope(q, qw, cos, sin, EPS),
                       lambda: kern.rms_norm_rope(q, qw, cos, sin, EPS), None, device, reps, on_gpu))
    want = ref.layer_norm_rope(k, kw, kb, icos, isin, EPS)
    got = kern.layer_norm_rope(k, kw, kb, icos, isin, EPS) if on_gpu else want
    out.append(_record("layer_norm_rope", T, ok([got], [want]), k.numel() * (2 + 4) + 2 * icos.numel() * 4,
                       lambda: ref.layer_norm_rope(k, kw, kb, icos, isin, EPS),
                       lambda: kern.layer_norm_rope(k, kw, kb, icos, isin, EPS), None, device, reps, on_gpu))
    return out
