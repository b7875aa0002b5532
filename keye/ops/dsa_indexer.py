"""DSA lightning indexer ops: FP8 scores + exact top-k for prefill and paged decode, the cache append, and the
fused Hadamard rotation + FP8 quantisation.

    q8, q_scale = keye.ops.indexer_rotate_quantize(q)          # q [T, H_I, D_I] after norm + RoPE
    k8, k_scale = keye.ops.indexer_rotate_quantize(k)          # k [T, D_I]
    idx = keye.ops.indexer_topk_prefill(q8, q_scale, w, k8, k_scale, cu_seqlens, topk=2048)

Semantics (scores, tie rule, output order, index conventions): keye/ops/reference/dsa_indexer.py. On CUDA the
scores come from FP8 tensor cores with the head sum as a bf16 tensor-core GEMM (prefill, and decode with more
than 16 (query, head) columns per sequence): each head's term is rounded to bf16, so a score is within ~6e-3 of
the sum of its |terms| of the reference's (exact float64 sums rounded once); decode with at most 16 columns
(Keye: one query x 16 heads) sums heads in fp32. Near-tied keys may therefore swap at the selection boundary.
The selection itself is exact on the kernel's scores (ties to lower positions) and identical run to run.

Prefill works through the sequences in query chunks: the chunk's scores [rows, keys] (fp32, at most
max_chunk_bytes) are written by the score kernel and read by the top-k kernel; no T x T matrix exists. Decode with
long contexts and few rows has each CTA of the score kernel also list its own candidates, and one CTA per row
selects from those lists (decode_uses_lists); many rows of long contexts bound the top-k by the maximum of every 8
scores (decode_uses_group_max).
"""

from __future__ import annotations

import torch

from keye._extension import kernels_available
from keye.ops._dispatch import use_kernel
from keye.ops.reference import dsa_indexer as ref

_CHUNK_BYTES = 1 << 30
_ROW_BLOCK = 128  # (query, head) columns of one score-kernel CTA: chunks hold whole CTAs of queries
GROUP_KEYS = 8  # scores per group maximum (kScoreGroupKeys in csrc/dsa_indexer/dsa_indexer.h)
# Decode bounds the top-k by group maxima from contexts of this many groups per selected key (2: 32K keys at topk
# 2048; with fewer the bound would take most of the row) and from this many query rows. H200, same-process A/B
# (NOTES.md, twenty-first session): one CTA per row spends ~20 us in serial steps, so with few rows the split
# chain, which spreads a row over many CTAs, is faster (1 row of 128K: 36.5 vs 39.7 us); from 64 rows the group
# maxima win at 128K keys (64 rows: 197.9 -> 190.3 us, 128 rows: 378.6 -> 342.8) and tie at 32K-64K keys; at 32
# rows of 128K they tie. The twenty-second session's run (group maxima launched plainly) kept the rule: 1 / 8 / 32
# rows of 128K 35.2 / 59.9 / 118.1 us split against 38.4 / 60.0 / 116.9, 64 rows 197.6 against 188.7.
GROUP_MAX_MIN_GROUPS_PER_TOPK = 2
GROUP_MAX_MIN_ROWS = 64
# Decode selects from the score kernel's candidate lists (indexer_topk_paged) from contexts of this many keys per
# selected key: each CTA lists the keys above about the m-th largest of its group maxima, m a few standard deviations
# above its expected share of the selection, ~2-3 topk keys per row in all from 32 keys per selected key on (at 16
# the lists would hold most of a 512-key unit and overflow the selection's shared memory), up to this many keys per
# row (the kernel sizes its units so a row has at most 256 of up to 16 pages: csrc/dsa_indexer/indexer_logits_decode.h)
# and up to this many keys in all (query rows x keys per row): the lists' epilogue lengthens the score stream, which
# with many keys costs more than the shorter selection saves. H200, us, split chain / group maxima / lists
# (NOTES.md): twenty-eighth session 1 row of 128K 36.0 / 38.9 / 27.5, 8 rows 56.2 / 57.2 / 50.2, 32 rows 116.3 /
# 112.1 / 128.8, 64 rows 195.4 / 185.5 / 199.3; twenty-ninth session 12 rows of 128K 67.8 / 67.3 / 61.7, 16 rows
# 76.5 / 75.3 / 72.0 and 77.1 / 88.7 / 82.2 (two calls), 20 rows 87.6 / 84.3 / 93.0, 24 rows 96.4 / 93.2 / 94.2,
# 32 rows of 64K 74.8 / 73.7 / 70.4 and 75.8 / 73.8 / 70.8, 48 rows of 64K 100.5 / 92.6 / 93.3; rows past 128K
# keys (wider units) at most LISTS_WIDE_MAX_ROWS rows: 1 row of 256K 40.5 / 43.6 / 32.4, 4 rows 59.6 / 59.8 / 45.6,
# 8 rows 78.8 / 78.6 / 84.4; thirty-first session (one call) 4 rows 58.5 / 59.9 / 45.6, 5 rows 64.2 / 63.8 / 63.9,
# 6 rows 69.3 / 70.2 / 67.5, 7 rows 74.9 / 72.6 / 69.1, 8 rows 78.7 / 78.4 / 85.0.
LISTS_MIN_KEYS_PER_TOPK = 32
LISTS_MAX_COLS = 1 << 18
LISTS_MAX_KEYS = 1 << 21
LISTS_WIDE_UNIT_COLS = 1 << 17
LISTS_WIDE_MAX_ROWS = 7


def decode_uses_group_max(rows: int, n: int, heads: int, cols: int, topk: int) -> bool:
    """Whether indexer_topk_decode has the score kernel write group maxima and bounds the top-k by them: the
    streaming score kernel (n * H_I <= 16), at least GROUP_MAX_MIN_ROWS query rows and contexts of at least
    GROUP_MAX_MIN_GROUPS_PER_TOPK groups per selected key."""
    return (n * heads <= 16 and rows >= GROUP_MAX_MIN_ROWS
            and cols >= GROUP_MAX_MIN_GROUPS_PER_TOPK * GROUP_KEYS * topk)


def decode_uses_lists(rows: int, n: int, heads: int, cols: int, topk: int) -> bool:
    """Whether indexer_topk_decode selects from the score kernel's candidate lists: the streaming score kernel
    (n * H_I <= 16), contexts of LISTS_MIN_KEYS_PER_TOPK keys per selected key up to LISTS_MAX_COLS keys, and at
    most LISTS_MAX_KEYS keys over all query rows (rows * cols), or at most LISTS_WIDE_MAX_ROWS query rows past
    LISTS_WIDE_UNIT_COLS keys per row."""
    few_enough = rows * cols <= LISTS_MAX_KEYS if cols <= LISTS_WIDE_UNIT_COLS else rows <= LISTS_WIDE_MAX_ROWS
    return n * heads <= 16 and LISTS_MIN_KEYS_PER_TOPK * topk <= cols <= LISTS_MAX_COLS and few_enough


def score_chunk_rows(max_len: int, heads: int, max_chunk_bytes: int) -> tuple[int, int]:
    """(row stride, query rows per chunk) of the fp32 score buffer for sequences of up to max_len tokens: rows of
    whole score-kernel query blocks when possible, at least one row, at most max_chunk_bytes in all."""
    ld = (max_len + 3) // 4 * 4
    rows = max(1, int(max_chunk_bytes) // (4 * ld))
    q_block = _ROW_BLOCK // heads
    if rows >= q_block:
        rows -= rows % q_block
    return ld, rows


def indexer_rotate_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hadamard rotation (orthonormal, over D_I) then FP8 e4m3 with one power-of-two scale per row.

    x: q [T, H_I, D_I] or k [T, D_I] (bf16/fp16/fp32, D_I in {32, 64, 128}) -> (x8 fp8 like x, scale fp32 [...])."""
    if isinstance(x, torch.Tensor) and use_kernel(x):
        ref.check_tensor(x, "indexer_rotate_quantize", "x", (torch.bfloat16, torch.float16, torch.float32), x.dim(),
                         "[..., D_I]")
        return tuple(torch.ops.keye.indexer_rotate_quantize(x.contiguous()))
    return ref.indexer_rotate_quantize(x)


def indexer_topk_prefill(q8, q_scale, w, k8, k_scale, cu_seqlens, topk: int, *, packed: bool = False,
                         return_scores: bool = False, max_chunk_bytes: int = _CHUNK_BYTES):
    """Causal top-k selection for a packed batch of sequences.

    q8 [T, H_I, D_I] fp8, q_scale [T, H_I] fp32, w [T, H_I] float, k8 [T, D_I] fp8, k_scale [T] fp32,
    cu_seqlens [B + 1] int (on any device; read on the host). Returns indices int32 [T, topk]: the selected
    positions within each query's sequence in ascending order (rows of the packed batch with packed=True), -1
    in the slots past min(topk, position + 1); with return_scores also their scores fp32 [T, topk] (-inf empty).
    max_chunk_bytes bounds the fp32 score buffer of one query chunk (at least one row is always processed).
    """
    if not use_kernel(q8, q_scale, w, k8, k_scale):
        return ref.indexer_topk_prefill(q8, q_scale, w, k8, k_scale, cu_seqlens, topk, packed=packed,
                                        return_scores=return_scores, max_chunk_bytes=max_chunk_bytes)
    bounds = ref.check_prefill_args(q8, q_scale, w, k8, k_scale, cu_seqlens, topk)
    T, H, D = q8.shape
    dev = q8.device
    # The kernels form each (query, head) factor w * D_I^-0.5 * q_scale themselves (no elementwise kernels here).
    q8, q_scale, w, k8, k_scale = (t.contiguous() for t in (q8, q_scale, w, k8, k_scale))
    indices = torch.empty(T, topk, dtype=torch.int32, device=dev)
    scores = torch.empty(T, topk, dtype=torch.float32, device=dev) if return_scores else None
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if T == 0:
        return (indices, scores) if return_scores else indices
    ld, rows = score_chunk_rows(max(lens), H, max_chunk_bytes)
    buf = torch.empty(min(rows, max(lens)) * ld, dtype=torch.float32, device=dev)
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        for a in range(s0, s1, rows):
            b = min(a + rows, s1)
            out = buf[: (b - a) * ld].view(b - a, ld)
            torch.ops.keye.indexer_logits(q8[a:b], q_scale[a:b], w[a:b], k8[s0:s1], k_scale[s0:s1], a - s0, out)
            lengths = torch.arange(a - s0 + 1, b - s0 + 1, dtype=torch.int32, device=dev)
            torch.ops.keye.topk_rows(out, lengths, topk, s0 if packed else 0, indices[a:b],
                                     scores[a:b] if scores is not None else None)
    return (indices, scores) if return_scores else indices


def indexer_topk_decode(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, topk: int, *,
                        physical: bool = False, return_scores: bool = False):
    """Selection for n new queries per sequence (decode, chunked or speculative) against the paged cache.

    q8 [B, n, H_I, D_I] fp8, q_scale and w [B, n, H_I]; k_cache [pages, 64, D_I] fp8, k_scale_cache [pages, 64]
    fp32; block_table [B, max_pages] int32; seq_lens [B] (the n new tokens are the last of each sequence and are
    already in the cache). Returns indices int32 [B, n, topk] in ascending order: positions within the sequence,
    or cache slots (page * 64 + offset) with physical=True; -1 = empty. No host sync (with index checks off),
    so it can be captured in a CUDA graph.
    """
    if not use_kernel(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens):
        return ref.indexer_topk_decode(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, topk,
                                       physical=physical, return_scores=return_scores)
    # Shapes and dtypes here (same messages as the reference); the value ranges are checked once, by the kernel op.
    ref.check_decode_args(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens, topk, ranges=False)
    B, n, H, D = q8.shape
    dev = q8.device
    seq_lens32 = seq_lens.to(torch.int32).contiguous()
    cols = block_table.shape[1] * ref.PAGE_SIZE
    buf = torch.empty(B * n, cols, dtype=torch.float32, device=dev)
    indices = torch.empty(B * n, topk, dtype=torch.int32, device=dev)
    scores = torch.empty(B * n, topk, dtype=torch.float32, device=dev) if return_scores else None
    q8, q_scale, w = q8.contiguous(), q_scale.contiguous(), w.contiguous()
    if decode_uses_lists(B * n, n, H, cols, topk):
        torch.ops.keye.indexer_topk_paged(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens32, topk, buf,
                                          indices, scores)
        return _decode_result(indices, scores, block_table, B, n, topk, physical)
    # Many rows of long contexts with the streaming score kernel: it also writes the maximum of every 8 scores, and
    # the top-k kernel bounds its search by them (one kernel per row reading a fraction of it instead of three
    # kernels reading all of it twice).
    group_max = None
    if decode_uses_group_max(B * n, n, H, cols, topk):
        group_max = torch.empty(B * n, cols // GROUP_KEYS, dtype=torch.float32, device=dev)
    torch.ops.keye.indexer_logits_paged(q8, q_scale, w, k_cache, k_scale_cache, block_table, seq_lens32, buf,
                                        group_max)
    # Query j of a sequence sees its first seq_len - n + 1 + j keys (no small kernels at all for n = 1: in a CUDA
    # graph each costs ~1 us, a few percent of the op).
    lengths = seq_lens32 if n == 1 else (
        seq_lens32.view(B, 1) + torch.arange(1 - n, 1, dtype=torch.int32, device=dev)).view(-1)
    torch.ops.keye.topk_rows(buf, lengths, topk, 0, indices, scores, group_max)
    return _decode_result(indices, scores, block_table, B, n, topk, physical)


def _decode_result(indices, scores, block_table, B, n, topk, physical):
    """indexer_topk_decode's return value from the selection [B * n, topk] (and its scores, or None)."""
    indices = indices.view(B, n, topk)
    if physical:  # one kernel (its arithmetic in PyTorch took ~12 small ones)
        indices = torch.ops.keye.paged_slots(indices, block_table)
    return (indices, scores.view(B, n, topk)) if scores is not None else indices


def indexer_cache_append(k8, k_scale, k_cache, k_scale_cache, slot_mapping) -> None:
    """Write new keys into the paged index-key cache in place: token i goes to slot slot_mapping[i]
    (= page * 64 + offset); slot -1 skips the token (padding)."""
    if use_kernel(k8, k_scale, k_cache, k_scale_cache, slot_mapping):
        torch.ops.keye.indexer_cache_append(k8, k_scale, k_cache, k_scale_cache, slot_mapping)
    else:
        ref.indexer_cache_append(k8, k_scale, k_cache, k_scale_cache, slot_mapping)


def _register() -> None:
    @torch.library.register_fake("keye::indexer_rotate_quantize")
    def _(x):
        return x.new_empty(x.shape, dtype=ref.FP8), x.new_empty(x.shape[:-1], dtype=torch.float32)

    torch.library.register_fake("keye::paged_slots")(lambda positions, block_table: torch.empty_like(positions))
    torch.library.impl("keye::paged_slots", "CPU")(ref.paged_slots)
    for name in ("indexer_logits", "indexer_logits_paged", "indexer_topk_paged", "topk_rows", "indexer_cache_append"):
        torch.library.register_fake(f"keye::{name}")(lambda *args, **kwargs: None)

    torch.library.impl("keye::indexer_rotate_quantize", "CPU")(lambda x: ref.indexer_rotate_quantize(x))
    torch.library.impl("keye::indexer_cache_append", "CPU")(ref.indexer_cache_append)


if kernels_available():
    _register()

__all__ = ["indexer_rotate_quantize", "indexer_topk_prefill", "indexer_topk_decode", "indexer_cache_append",
           "score_chunk_rows"]
