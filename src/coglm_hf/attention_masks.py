"""CogLM attention masks and sequence layouts as pure functions (no weights).

CogLM's pretraining objective (Eq. 1 of the CogView2 paper) splits a sequence into *context* and *mask regions*:

* a context token attends to every context token (bidirectional) and to nothing inside a region;
* a region token attends to every context token and, causally, to the region tokens at or before it (in any region);
* inside a region ``(l, r)`` (inclusive), positions ``l … r-1`` predict the tokens at ``l+1 … r`` (Eq. 2).

Every CogView2 layout of the base model is an instance: text→image generation is one region starting at
``<start_of_image>``; caption scoring is one region starting at the language tag; plain causal LM is one
region covering the whole sequence. This file ships as remote code: it imports only ``torch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Region = tuple[int, int]


def validate_regions(seq_len: int, regions: Sequence[Sequence[int]]) -> list[Region]:
    """Check that ``regions`` are inclusive ``(l, r)`` pairs, sorted, non-overlapping and inside ``[0, seq_len)``."""
    checked: list[Region] = []
    previous_end = -1
    for index, region in enumerate(regions):
        if len(region) != 2:
            raise ValueError(f"mask region #{index} must be an (l, r) pair, got {region!r}")
        left, right = int(region[0]), int(region[1])
        if not 0 <= left <= right < seq_len:
            raise ValueError(
                f"mask region #{index} ({left}, {right}) is out of range: need 0 <= l <= r < seq_len={seq_len} "
                "(regions are inclusive index pairs)"
            )
        if left <= previous_end:
            raise ValueError(
                f"mask regions must be sorted and non-overlapping; region #{index} ({left}, {right}) starts at or "
                f"before the end of the previous one ({previous_end})"
            )
        previous_end = right
        checked.append((left, right))
    return checked


def region_membership(seq_len: int, regions: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Bool ``[seq_len]``: True at positions inside any mask region."""
    inside = torch.zeros(seq_len, dtype=torch.bool, device=device)
    for left, right in validate_regions(seq_len, regions):
        inside[left : right + 1] = True
    return inside


def masked_regions_mask(seq_len: int, regions: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Eq. 1 of the CogView2 paper as a bool ``[seq_len, seq_len]`` matrix (True = query row may attend key column).

    ``M[i, j] = (j is context) or (i and j are region tokens and j <= i)``.
    """
    inside = region_membership(seq_len, regions, device=device)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    context_key = ~inside
    return context_key[None, :] | (inside[:, None] & inside[None, :] & causal)


def masked_regions_loss_mask(seq_len: int, regions: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Bool ``[seq_len]``: True at positions whose output is scored (Eq. 2: ``l … r-1`` predict ``l+1 … r``)."""
    scored = torch.zeros(seq_len, dtype=torch.bool, device=device)
    for left, right in validate_regions(seq_len, regions):
        scored[left:right] = True
    return scored


def batch_masked_regions_mask(
    seq_len: int, batch_regions: Sequence[Sequence[Sequence[int]]], device=None
) -> torch.Tensor:
    """Stack :func:`masked_regions_mask` over a batch: bool ``[batch, seq_len, seq_len]``."""
    return torch.stack([masked_regions_mask(seq_len, regions, device=device) for regions in batch_regions])


def text_to_image_regions(text_length: int, num_image_tokens: int) -> list[Region]:
    """Text→image layout ``[text (L), <start_of_image>, image (n)]``: one region from ``<start_of_image>`` to the end."""
    return [(text_length, text_length + num_image_tokens)]


def text_to_image_position_ids(text_length: int, num_image_tokens: int, boi_position_id: int = 512) -> torch.Tensor:
    """Positions of the text→image layout: text ``0 … L-1``, ``<start_of_image>`` at 512, image tokens ``513 …``."""
    text = torch.arange(text_length)
    image = boi_position_id + torch.arange(num_image_tokens + 1)
    return torch.cat([text, image])


def caption_scoring_regions(num_image_tokens: int, caption_length: int) -> list[Region]:
    """Caption-scoring layout ``[image (N), language tag, caption (C)]``: the tag and caption form one region."""
    return [(num_image_tokens, num_image_tokens + caption_length)]


def caption_scoring_position_ids(num_image_tokens: int, caption_length: int, boi_position_id: int = 512) -> torch.Tensor:
    """Positions of the caption-scoring layout: image ``513 …``, language tag 0, caption ``1 … C``."""
    image = boi_position_id + 1 + torch.arange(num_image_tokens)
    return torch.cat([image, torch.arange(caption_length + 1)])


def packed_segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Sequence index of every token of a packed (padding-free) batch: ``[batch, q]`` position ids → ``[batch, q]``.

    A position that does not increase over the previous one starts a new sequence (``DataCollatorWithFlattening``
    restarts positions at 0). CogView2 layouts jump forward (text ``0 … L-1``, then ``<start_of_image>`` at 512),
    which stays one sequence.
    """
    starts = torch.zeros_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] <= position_ids[:, :-1]).long()
    return starts.cumsum(-1)


def segments_from_cu_seq_lens(cu_seq_lens: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Sequence index ``[1, seq_len]`` of each token from flash-attention style cumulative boundaries
    ``cu_seq_lens`` ``[n + 1]`` (``0, len_0, len_0 + len_1, …, seq_len``) of a packed batch of one row."""
    cu_seq_lens = cu_seq_lens.reshape(-1)
    if batch != 1 or int(cu_seq_lens[0]) != 0 or int(cu_seq_lens[-1]) != seq_len:
        raise ValueError(
            f"cu_seq_lens_q must run from 0 to the packed length {seq_len} of a batch of one row; got "
            f"{cu_seq_lens.tolist()} for batch {batch}"
        )
    tokens = torch.arange(seq_len, device=cu_seq_lens.device)
    return torch.searchsorted(cu_seq_lens[1:].contiguous(), tokens, right=True)[None]


__all__ = [
    "Region",
    "batch_masked_regions_mask",
    "caption_scoring_position_ids",
    "caption_scoring_regions",
    "masked_regions_loss_mask",
    "masked_regions_mask",
    "packed_segment_ids",
    "region_membership",
    "segments_from_cu_seq_lens",
    "text_to_image_position_ids",
    "text_to_image_regions",
    "validate_regions",
]
