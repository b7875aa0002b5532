"""3D M-RoPE position ids against hand-computed values of the documented rule (docs/keye-vl-2.md §2.4)."""

import pytest
import torch

from keye.processor.positions import decode_position_ids, mrope_position_ids

IMG, VID = 151655, 151656
T = 100  # any text token
KW = dict(image_token_id=IMG, video_token_id=VID)


def ids(*xs):
    return torch.tensor(xs, dtype=torch.long)


def test_text_only_is_arange_in_all_rows():
    pos, nxt = mrope_position_ids(ids(*range(7)), **KW)
    assert pos.tolist() == [list(range(7))] * 3
    assert int(nxt) == 7


def test_one_image():
    # Two text tokens, an image with patch grid (1, 4, 6) -> merged 2 x 3 = 6 tokens, one text token.
    # Image start = 2: t = 2; h = 2 + row; w = 2 + col. Next = 2 + max(1, 2, 3) = 5.
    x = ids(T, T, IMG, IMG, IMG, IMG, IMG, IMG, T)
    pos, nxt = mrope_position_ids(x, torch.tensor([[1, 4, 6]]), **KW)
    assert pos.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],
        [0, 1, 2, 2, 2, 3, 3, 3, 5],
        [0, 1, 2, 3, 4, 2, 3, 4, 5],
    ]
    assert int(nxt) == 6


def test_two_frame_video_with_timestamps():
    # <vs> <frame> "0" "." "0" [2x2 pads] <frame> "0" "." "5" [2x2 pads] <ve> text
    # Every frame is its own (1, 4, 4) grid (merged 2 x 2); the frame token and the digits are text.
    x = ids(T, T, T, T, T, VID, VID, VID, VID, T, T, T, T, VID, VID, VID, VID, T, T)
    grids = torch.tensor([[1, 4, 4], [1, 4, 4]])
    pos, nxt = mrope_position_ids(x, None, grids, **KW)
    # text 0..4; frame 1 start 5 -> t 5, h 5/5/6/6, w 5/6/5/6; next = 5 + 2 = 7; text 7..10;
    # frame 2 start 11 -> t 11, h 11/11/12/12, w 11/12/11/12; next = 13; text 13, 14.
    assert pos.tolist() == [
        [0, 1, 2, 3, 4, 5, 5, 5, 5, 7, 8, 9, 10, 11, 11, 11, 11, 13, 14],
        [0, 1, 2, 3, 4, 5, 5, 6, 6, 7, 8, 9, 10, 11, 11, 12, 12, 13, 14],
        [0, 1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12, 11, 12, 13, 14],
    ]
    assert int(nxt) == 15


def test_image_and_video_interleaved_and_multi_t_grid():
    # A video frame first, then an image with t = 2 (reference rule: t row = start + k), grids consumed by kind.
    x = ids(VID, VID, T, IMG, IMG, IMG, IMG, T)
    pos, nxt = mrope_position_ids(x, torch.tensor([[2, 2, 4]]), torch.tensor([[1, 2, 4]]), **KW)
    # frame at 0: (1, 1, 2) merged -> t 0 0, h 0 0, w 0 1; next 2; text 2; image start 3, merged (2, 1, 2):
    # t 3 3 4 4, h 3 3 3 3, w 3 4 3 4; next = 3 + 2 = 5.
    assert pos.tolist() == [
        [0, 0, 2, 3, 3, 4, 4, 5],
        [0, 0, 2, 3, 3, 3, 3, 5],
        [0, 1, 2, 3, 4, 3, 4, 5],
    ]
    assert int(nxt) == 6


def test_batch_with_padding_consumes_grids_row_by_row():
    a = [T, IMG, IMG, T, 0]           # right padded
    b = [0, 0, T, VID, VID]           # left padded
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    pos, nxt = mrope_position_ids(torch.tensor([a, b]), torch.tensor([[1, 2, 4]]), torch.tensor([[1, 2, 4]]),
                                  attention_mask=mask, **KW)
    assert pos.shape == (3, 2, 5)
    assert pos[:, 0].tolist() == [[0, 1, 1, 3, 1], [0, 1, 1, 3, 1], [0, 1, 2, 3, 1]]
    assert pos[:, 1].tolist() == [[1, 1, 0, 1, 1], [1, 1, 0, 1, 1], [1, 1, 0, 1, 2]]
    assert nxt.tolist() == [4, 3]


def test_matches_independent_loop_on_random_layouts(fresh_seed):
    """A second, deliberately naive implementation of the rule (token by token) on random layouts."""
    g = torch.Generator().manual_seed(fresh_seed)
    for _ in range(30):
        seq, img_grids, vid_grids = [], [], []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            seq += [T] * int(torch.randint(0, 4, (1,), generator=g))
            kind = int(torch.randint(0, 2, (1,), generator=g))
            t = int(torch.randint(1, 3, (1,), generator=g)) if kind == 0 else 1
            h, w = 2 * int(torch.randint(1, 4, (1,), generator=g)), 2 * int(torch.randint(1, 4, (1,), generator=g))
            (img_grids if kind == 0 else vid_grids).append([t, h, w])
            seq += [IMG if kind == 0 else VID] * (t * h * w // 4)
        seq += [T] * int(torch.randint(0, 3, (1,), generator=g))
        expected, nxt, i, gi, gv = [], 0, 0, 0, 0
        while i < len(seq):
            if seq[i] == T:
                expected.append((nxt, nxt, nxt))
                nxt, i = nxt + 1, i + 1
                continue
            grid = img_grids[gi] if seq[i] == IMG else vid_grids[gv]
            gi, gv = (gi + 1, gv) if seq[i] == IMG else (gi, gv + 1)
            t, h, w = grid[0], grid[1] // 2, grid[2] // 2
            for k in range(t):
                for r in range(h):
                    for c in range(w):
                        expected.append((nxt + k, nxt + r, nxt + c))
            i += t * h * w
            nxt += max(t, h, w)
        pos, got_next = mrope_position_ids(torch.tensor(seq), torch.tensor(img_grids).view(-1, 3),
                                           torch.tensor(vid_grids).view(-1, 3), **KW)
        assert pos.t().tolist() == [list(e) for e in expected]
        assert int(got_next) == nxt == int(pos.max()) + 1  # generation continues from max + 1


def test_decode_positions():
    assert decode_position_ids(15, 3).tolist() == [[15, 16, 17]] * 3
    assert decode_position_ids(torch.tensor([4, 9]), 2).tolist() == [[[4, 5], [9, 10]]] * 3
    with pytest.raises(ValueError, match="num_tokens"):
        decode_position_ids(3, -1)
    with pytest.raises(ValueError, match="next_position"):
        decode_position_ids(torch.tensor(2.5))


@pytest.mark.parametrize("seq, img, vid, match", [
    ([T, IMG, IMG], [[1, 2, 4], [1, 2, 2]], None, "uses 1 of 2 image grids"),
    ([T, IMG, IMG, IMG], [[1, 2, 4]], None, "more image placeholder runs"),
    ([T, IMG, T, IMG], [[1, 2, 4]], None, "needs 2 consecutive"),
    ([T, VID, VID], None, None, "more video placeholder runs"),
    ([T, IMG], [[1, 2, 3]], None, "multiples of merge_size"),
    ([T, IMG], [[0, 2, 2]], None, "positive"),
    ([T, IMG], [[1.0, 2.0, 2.0]], None, "integer tensor"),
])
def test_mismatched_grids_raise(seq, img, vid, match):
    with pytest.raises(ValueError, match=match):
        mrope_position_ids(torch.tensor(seq), None if img is None else torch.tensor(img),
                           None if vid is None else torch.tensor(vid), **KW)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="input_ids"):
        mrope_position_ids(torch.zeros(3), **KW)
    with pytest.raises(ValueError, match="input_ids"):
        mrope_position_ids(torch.zeros(1, 2, 3, dtype=torch.long), **KW)
    with pytest.raises(ValueError, match="both"):
        mrope_position_ids(ids(1, 2), image_token_id=5, video_token_id=5)
    with pytest.raises(ValueError, match="attention_mask"):
        mrope_position_ids(ids(1, 2).view(1, 2), attention_mask=torch.ones(1, 3), **KW)
    with pytest.raises(ValueError, match="merge_size"):
        mrope_position_ids(ids(1, 2), merge_size=0, **KW)


def test_long_video_sequence_is_fast():
    """720 frames x 256 tokens (the full 2.0 budget) plus timestamp text: ~190K tokens in well under a second."""
    import time
    frame = [T] * 5 + [VID] * 256
    seq = torch.tensor([T] * 20 + frame * 720 + [T] * 20)
    grids = torch.tensor([[1, 32, 32]] * 720)
    start = time.perf_counter()
    pos, nxt = mrope_position_ids(seq, None, grids, **KW)
    elapsed = time.perf_counter() - start
    # Each frame advances the position by 5 text + 16 (grid side): 20 + 720 * 21 + 20.
    assert int(nxt) == 20 + 720 * 21 + 20
    assert pos.shape == (3, seq.numel())
    assert elapsed < 5.0, elapsed
