"""Eq. 1 masks and the CogView2 layouts, checked against hand-enumerated matrices and the official rules."""

import pytest
import torch

from coglm_hf.attention_masks import (
    caption_scoring_position_ids,
    caption_scoring_regions,
    masked_regions_loss_mask,
    masked_regions_mask,
    text_to_image_position_ids,
    text_to_image_regions,
)


def as_rows(mask: torch.Tensor) -> list[str]:
    return ["".join("1" if v else "." for v in row) for row in mask.tolist()]


def test_single_region_hand_enumerated():
    # context 0,1 | region 2..4 | context 5
    assert as_rows(masked_regions_mask(6, [(2, 4)])) == [
        "11...1",
        "11...1",
        "111..1",
        "1111.1",
        "111111",
        "11...1",
    ]


def test_two_regions_are_causal_across_regions():
    # context 0 | region 1..2 | context 3 | region 4..5
    assert as_rows(masked_regions_mask(6, [(1, 2), (4, 5)])) == [
        "1..1..",
        "11.1..",
        "1111..",
        "1..1..",
        "11111.",
        "111111",
    ]


def test_loss_mask_counts_region_pairs_only():
    scored = masked_regions_loss_mask(8, [(1, 3), (5, 7)])
    # l … r-1 predict l+1 … r
    assert scored.tolist() == [False, True, True, False, False, True, True, False]
    assert int(masked_regions_loss_mask(5, [(2, 2)]).sum()) == 0


def test_text_to_image_layout_is_the_official_mask():
    text_length, n = 5, 7
    seq = text_length + 1 + n
    ours = masked_regions_mask(seq, text_to_image_regions(text_length, n))
    i, j = torch.meshgrid(torch.arange(seq), torch.arange(seq), indexing="ij")
    official = (j <= i) | (j < text_length)  # official text→image: causal plus every row sees all text
    assert torch.equal(ours, official)
    positions = text_to_image_position_ids(text_length, n)
    assert positions.tolist() == [0, 1, 2, 3, 4, 512, 513, 514, 515, 516, 517, 518, 519]


def test_caption_scoring_layout_is_the_official_mask():
    num_image, caption = 6, 3
    seq = num_image + 1 + caption
    ours = masked_regions_mask(seq, caption_scoring_regions(num_image, caption))
    i, j = torch.meshgrid(torch.arange(seq), torch.arange(seq), indexing="ij")
    official = (j < num_image) | ((i >= num_image) & (j <= i))  # official caption scoring
    assert torch.equal(ours, official)
    assert caption_scoring_position_ids(num_image, caption).tolist() == [513, 514, 515, 516, 517, 518, 0, 1, 2, 3]


@pytest.mark.parametrize(
    "regions, message",
    [
        ([(3, 5), (1, 2)], "sorted"),
        ([(1, 4), (4, 6)], "non-overlapping"),
        ([(2, 9)], "out of range"),
        ([(-1, 2)], "out of range"),
        ([(3, 1)], "out of range"),
        ([(1, 2, 3)], "pair"),
    ],
)
def test_bad_regions_are_clear_errors(regions, message):
    with pytest.raises(ValueError, match=message):
        masked_regions_mask(8, regions)
