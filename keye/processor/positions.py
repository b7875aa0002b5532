"""3D M-RoPE position ids of Keye-VL 1.5 / 2.0 (`get_rope_index_keye`; docs/keye-vl-2.md §2.4).

Rule, walking the sequence left to right with `next` = 0 at the start:
* A text token (anything that is not an image/video placeholder) gets (next, next, next); next += 1.
* An image, or ONE video frame, is a grid (t, gh, gw) in ViT patches and occupies t * (gh/m) * (gw/m)
  consecutive placeholder tokens (m = spatial merge, 2), in raster order (frame, row, column). With
  start = next, the token at (k, row, col) gets (start + k, start + row, start + col). Afterwards
  next = max(position in the grid) + 1 = start + max(t, gh/m, gw/m).
* Every video frame is its own grid with t = 1; the `<|frame|>` token and the timestamp digits between frames
  are ordinary text. Time is therefore carried by the frame order and the timestamp text only.
* Decoding continues from `next_position` (= max position + 1), the same value in all three rows.

Grids are consumed in order of appearance: the next image placeholder takes the next `image_grid_thw` row, the
next video placeholder the next `video_grid_thw` row. Unlike the reference (which silently misassigns), a
placeholder count that does not match the grids is a ValueError.
"""

from bisect import bisect_left

import torch


def check_grid_thw(grids, what: str, merge: int, op: str = "mrope_position_ids") -> list[tuple[int, int, int]]:
    """Image / video-frame grids [N, 3] (t, h, w) as a list of tuples: integers, positive, h and w multiples of the
    merge size (None or empty -> []). Shared by the processor and the model's vision tower; errors start with op."""
    if grids is None:
        return []
    if not isinstance(grids, torch.Tensor):
        grids = torch.as_tensor(grids)
    if grids.numel() == 0:
        return []
    if grids.dim() != 2 or grids.shape[1] != 3 or grids.dtype.is_floating_point or grids.dtype == torch.bool:
        raise ValueError(f"{op}: {what} must be an integer tensor [N, 3] (t, h, w), got "
                         f"{grids.dtype} {list(grids.shape)}")
    out = [tuple(int(v) for v in row) for row in grids.tolist()]
    for g in out:
        if min(g) < 1 or g[1] % merge or g[2] % merge:
            raise ValueError(f"{op}: {what} entry {list(g)} must be positive with h and w multiples of the merge "
                             f"size (multiples of merge_size {merge})")
    return out


def _row_positions(ids: list[int], image_grids, video_grids, image_token_id: int, video_token_id: int,
                   merge: int) -> tuple[torch.Tensor, int, int, int]:
    """Positions [3, len(ids)] of one unpadded sequence, consuming grids from the front of the two lists
    (given as (list, start index)). Returns (positions, next_position, images used, video frames used)."""
    img_at = [i for i, x in enumerate(ids) if x == image_token_id]
    vid_at = [i for i, x in enumerate(ids) if x == video_token_id]
    grids_img, gi = image_grids
    grids_vid, vi = video_grids
    pos = torch.empty(3, len(ids), dtype=torch.long)
    st, nxt, used_i, used_v = 0, 0, 0, 0
    while True:
        ki, kv = bisect_left(img_at, st), bisect_left(vid_at, st)
        ed_i = img_at[ki] if ki < len(img_at) else len(ids)
        ed_v = vid_at[kv] if kv < len(vid_at) else len(ids)
        if ed_i == ed_v == len(ids):
            break
        if ed_i < ed_v:
            kind, ed, grids, g = "image", ed_i, grids_img, gi + used_i
            used_i += 1
        else:
            kind, ed, grids, g = "video", ed_v, grids_vid, vi + used_v
            used_v += 1
        if g >= len(grids):
            raise ValueError(f"mrope_position_ids: more {kind} placeholder runs than {kind} grids ({len(grids)})")
        t, h, w = grids[g][0], grids[g][1] // merge, grids[g][2] // merge
        n = t * h * w
        pad = image_token_id if kind == "image" else video_token_id
        if ed + n > len(ids) or any(x != pad for x in ids[ed:ed + n]):
            raise ValueError(f"mrope_position_ids: {kind} grid {g} {list(grids[g])} needs {n} consecutive "
                             f"placeholder tokens at index {ed}, the sequence has fewer there")
        pos[:, st:ed] = torch.arange(nxt, nxt + ed - st)
        nxt += ed - st
        pos[0, ed:ed + n] = (nxt + torch.arange(t)).repeat_interleave(h * w)
        pos[1, ed:ed + n] = (nxt + torch.arange(h)).repeat_interleave(w).repeat(t)
        pos[2, ed:ed + n] = (nxt + torch.arange(w)).repeat(t * h)
        nxt += max(t, h, w)
        st = ed + n
    pos[:, st:] = torch.arange(nxt, nxt + len(ids) - st)
    nxt += len(ids) - st
    return pos, nxt, used_i, used_v


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw=None, video_grid_thw=None, *,
                       image_token_id: int, video_token_id: int, merge_size: int = 2,
                       attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids for the rule in the module doc.

    input_ids [T] -> (position_ids [3, T], next_position: 0-d long tensor)
    input_ids [B, T] -> (position_ids [3, B, T], next_position [B]); grids are consumed row after row, and with
    `attention_mask` [B, T] (1 = token, 0 = padding) only the unmasked tokens count; padded slots get 1 (as in
    the reference). `video_grid_thw` holds one (1, gh, gw) row per frame. Outputs are on input_ids' device.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) \
            or input_ids.dtype not in (torch.int32, torch.int64):
        what = getattr(input_ids, "dtype", type(input_ids).__name__)
        raise ValueError(f"mrope_position_ids: input_ids must be an int32/int64 tensor [T] or [B, T], got {what} "
                         f"{list(getattr(input_ids, 'shape', []))}")
    if isinstance(merge_size, bool) or not isinstance(merge_size, int) or merge_size <= 0:
        raise ValueError(f"mrope_position_ids: merge_size must be a positive int, got {merge_size!r}")
    if image_token_id == video_token_id:
        raise ValueError(f"mrope_position_ids: image_token_id and video_token_id are both {image_token_id}")
    images = check_grid_thw(image_grid_thw, "image_grid_thw", merge_size)
    videos = check_grid_thw(video_grid_thw, "video_grid_thw", merge_size)
    single = input_ids.dim() == 1
    ids2d = input_ids.unsqueeze(0) if single else input_ids
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids2d.shape:
            raise ValueError(f"mrope_position_ids: attention_mask must be a tensor of shape {list(ids2d.shape)}, got "
                             f"{list(getattr(attention_mask, 'shape', []))}")
        mask = attention_mask.detach().cpu().bool()
    else:
        mask = torch.ones(ids2d.shape, dtype=torch.bool)

    ids_cpu = ids2d.detach().cpu()
    out = torch.ones(3, *ids2d.shape, dtype=torch.long)
    nexts = torch.empty(ids2d.shape[0], dtype=torch.long)
    gi = gv = 0
    for b in range(ids2d.shape[0]):
        row = ids_cpu[b][mask[b]].tolist()
        pos, nxt, ui, uv = _row_positions(row, (images, gi), (videos, gv), image_token_id, video_token_id,
                                          merge_size)
        out[:, b, mask[b]] = pos
        nexts[b] = nxt
        gi, gv = gi + ui, gv + uv
    if gi != len(images) or gv != len(videos):
        raise ValueError(f"mrope_position_ids: the sequence uses {gi} of {len(images)} image grids and {gv} of "
                         f"{len(videos)} video grids; every grid must have its placeholder tokens")
    device = input_ids.device
    if single:
        return out[:, 0].to(device), nexts[0].to(device)
    return out.to(device), nexts.to(device)


def decode_position_ids(next_position, num_tokens: int = 1) -> torch.Tensor:
    """Positions of the next `num_tokens` generated tokens: next_position + arange, equal in all three rows.
    next_position: int or 0-d tensor -> [3, num_tokens]; tensor [B] -> [3, B, num_tokens]."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"decode_position_ids: num_tokens must be an int >= 0, got {num_tokens!r}")
    nxt = torch.as_tensor(next_position)
    if nxt.dtype.is_floating_point or nxt.dim() > 1:
        raise ValueError(f"decode_position_ids: next_position must be an int or an integer tensor [B], got {nxt}")
    steps = torch.arange(num_tokens, device=nxt.device)
    pos = nxt.long().unsqueeze(-1) + steps  # [num_tokens] or [B, num_tokens]
    return pos.unsqueeze(0).expand(3, *pos.shape).contiguous()
