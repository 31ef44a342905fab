"""Collators that turn (image tokens, caption ids) samples into training batches for the three CogView2 stages.

A *sample* (what :mod:`coglm_hf.training.data` yields) is a dict with

* ``image_tokens``: stage-1 grid ``[g, g]`` (or flat ``[g*g]``) of VQ ids (20×20 in CogView2);
* ``hires_tokens``: super-resolution grid ``[G, G]`` (60×60) of the same image (SR stages only);
* ``text_ids``: caption ids (text ids, i.e. sentencepiece id + ``text_token_offset``);
* ``text_ids_2`` (optional): the caption in a second language; a bilingual sample uses one language per row;
* ``index`` / ``epoch`` (optional): the sample's position in the dataset and the current epoch. When present, the
  sample's random choices come from a generator seeded by ``(seed, epoch, index)`` — identical across dataloader
  workers, ranks and resumed runs; without them the collator's own seeded generator is used.

Base stage (the official pretraining formats, Eq. 1/2 of the paper). Every row is an Eq. 1 instance: *context* tokens attend
bidirectionally among the context, *region* tokens attend to all context and causally to every region token at or
before them; inside a region ``(l, r)`` positions ``l … r-1`` predict ``l+1 … r``. Two row types, mixed by
``caption_ratio`` (0.5 as in the paper; the released pretraining code used 0.3):

* text→image: ``[text (L), <start_of_image>, image (N)]``, positions ``0 … L-1, 512, 513 …``, one region
  ``(L, L+N)``. Text is bidirectional, the image causal and sees the text; loss on the N image tokens.
* mask prediction + captioning: ``[image (N), tag, caption (C)]``, positions ``513 …, 0, 1 … C``. 4×4 patches are
  drawn until ``mask_coverage`` (75 %) of the grid is covered; every run of covered cells within one grid row is
  a region (its first cell is given, the others are predicted), and ``tag + caption`` is the last region (the
  caption is predicted). Non-patch image tokens see only each other; patch tokens are causal over the patches in
  raster order and see every non-patch token; the caption sees the whole image. The tag is ``<start_of_english>``
  when every caption id is below ``text_token_offset + chinese_piece_start`` (icetk: 83823), else
  ``<start_of_chinese>``. With ``caption_end_token_id`` (not in the official layout) the caption is followed by that
  id, predicted like the caption, so that a model finetuned this way learns where captions end (captioning
  generation stops there; see ``CogView2CaptionPipeline``).

Labels are -100 everywhere except at predicted positions, so ``labels.ne(-100).sum()`` (what the Trainer uses for
``num_items_in_batch``) equals the number of loss terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..attention_masks import Region
from ..configuration_coglm import CogLMConfig
from ..sampling import LOPAR_ORDER_MATRIX, lopar_num_passes, lopar_regeneration_mask

IGNORE_INDEX = -100
# Sentencepiece ids of icetk's text model: English pieces end where the Chinese pieces begin (id 83823 − 20000).
ICETK_CHINESE_PIECE_START = 63823
# Mask ratios of the iterative super-resolution objective (CogView2 paper).
ITERATIVE_SR_MASK_RATIOS = (0.2, 0.4, 0.6, 0.8, 0.9)

_MIX_A, _MIX_B, _SEED_MOD = 1_000_003, 998_244_353, 2**63 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 63-bit seed of one sample's random choices from ``(collator seed, epoch, dataset index)``."""
    return ((int(seed) * _MIX_A + int(epoch)) * _MIX_B + int(index)) % _SEED_MOD


@dataclass
class CogLMRow:
    """One unpadded base-stage row: ids, positions, Eq. 1 regions and labels (-100 = not a loss target)."""

    input_ids: list[int]
    position_ids: list[int]
    mask_regions: list[Region]
    labels: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.labels:
            self.labels = [IGNORE_INDEX] * len(self.input_ids)
            for left, right in self.mask_regions:
                self.labels[left + 1 : right + 1] = self.input_ids[left + 1 : right + 1]


# ------------------------------------------------------------------------------------------------ input checks
def _as_grid(tokens, side: int, name: str, config: CogLMConfig) -> torch.Tensor:
    """Accept ``[side, side]`` or ``[side*side]`` (tensor, array or list) and return a long ``[side, side]`` tensor."""
    grid = torch.as_tensor(tokens).long()
    if grid.numel() != side * side:
        raise ValueError(f"{name} must hold a {side}×{side} grid ({side * side} ids), got shape {list(grid.shape)}")
    grid = grid.reshape(side, side)
    if grid.numel() and (int(grid.min()) < 0 or int(grid.max()) >= config.num_image_tokens):
        raise ValueError(f"{name} must be image ids in [0, {config.num_image_tokens}); got [{int(grid.min())}, "
                         f"{int(grid.max())}] — pass VQ codebook indices, not text ids")
    return grid


def _as_text(ids, config: CogLMConfig, name: str = "text_ids") -> list[int]:
    text = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if not text:
        raise ValueError(f"{name} is empty; filter samples with empty captions (the datasets of "
                         "coglm_hf.training.data skip them)")
    bad = [i for i in text if not config.text_token_offset <= i < config.boi_token_id]
    if bad:
        raise ValueError(
            f"{name} must be text ids in [{config.text_token_offset}, {config.boi_token_id}) (sentencepiece id + "
            f"text_token_offset, as CogLMTokenizer returns them); got e.g. {bad[:3]}"
        )
    return text


# ------------------------------------------------------------------------------------------------ base-stage rows
def text_to_image_row(text_ids: Sequence[int], image_tokens: torch.Tensor, config: CogLMConfig) -> CogLMRow:
    """Text→image row (the official inference and pretraining layout) ``[text (L), <start_of_image>, image (N)]`` with one region ``(L, L+N)``."""
    text = list(text_ids)[: config.max_text_length]
    image = image_tokens.reshape(-1).tolist()
    length = len(text)
    input_ids = text + [config.boi_token_id] + image
    position_ids = list(range(length)) + [config.boi_position_id + j for j in range(len(image) + 1)]
    return CogLMRow(input_ids, position_ids, [(length, length + len(image))])


def patch_regions(patch_mask: torch.Tensor) -> list[Region]:
    """Regions of a boolean ``[g, g]`` patch mask: every maximal run of True cells inside one grid row, as inclusive
    ``(l, r)`` indices into the raster-ordered image (sorted, non-overlapping)."""
    side = patch_mask.shape[-1]
    regions: list[Region] = []
    for row, cells in enumerate(patch_mask.tolist()):
        col = 0
        while col < side:
            if cells[col]:
                start = col
                while col + 1 < side and cells[col + 1]:
                    col += 1
                regions.append((row * side + start, row * side + col))
            col += 1
    return regions


def caption_row(
    image_tokens: torch.Tensor,
    text_ids: Sequence[int],
    patch_mask: torch.Tensor,
    language_token_id: int,
    config: CogLMConfig,
    end_token_id: int | None = None,
) -> CogLMRow:
    """Mask prediction + captioning row ``[image (N), tag, caption (C)]`` (the official pretraining format as one Eq. 1 instance).

    Regions: the per-row runs of ``patch_mask`` (see :func:`patch_regions`), then ``(N, N+C)`` for tag + caption.
    Positions: image ``boi_position_id + 1 …``, tag 0, caption ``1 … C``. ``end_token_id`` (optional) is appended
    to the caption (and counted in ``C``): the end-of-caption target of captioning finetunes.
    """
    # the caption's last position C must stay below the <start_of_image> position
    limit = min(config.max_text_length, config.boi_position_id - 1)
    if end_token_id is None:
        text = list(text_ids)[:limit]
    else:
        text = list(text_ids)[: limit - 1] + [int(end_token_id)]
    image = image_tokens.reshape(-1).tolist()
    num_image = len(image)
    input_ids = image + [language_token_id] + text
    position_ids = [config.boi_position_id + 1 + j for j in range(num_image)] + list(range(len(text) + 1))
    regions = patch_regions(patch_mask) + [(num_image, num_image + len(text))]
    return CogLMRow(input_ids, position_ids, regions)


def sample_patch_mask(
    grid_size: int, patch_size: int, coverage: float, generator: torch.Generator
) -> torch.Tensor:
    """Draw ``patch_size``² patches (upper-left corners uniform over the admissible positions, overlaps allowed)
    until at least ``coverage`` of the ``grid_size``² cells are covered. Returns a bool ``[grid, grid]`` mask."""
    if not 0 < patch_size <= grid_size:
        raise ValueError(f"patch_size ({patch_size}) must be in [1, image grid size {grid_size}]")
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"mask_coverage must be in (0, 1), got {coverage}")
    mask = torch.zeros(grid_size, grid_size, dtype=torch.bool)
    corners = grid_size - patch_size + 1
    target = coverage * grid_size * grid_size
    while mask.sum() < target:
        corner = int(torch.randint(corners * corners, (1,), generator=generator))
        top, left = divmod(corner, corners)
        mask[top : top + patch_size, left : left + patch_size] = True
    return mask


def language_token_id(text_ids: Sequence[int], config: CogLMConfig, chinese_piece_start: int) -> int:
    """``<start_of_english>`` if every id is below ``text_token_offset + chinese_piece_start``, else Chinese."""
    limit = config.text_token_offset + chinese_piece_start
    return config.start_of_english_token_id if all(i < limit for i in text_ids) else config.start_of_chinese_token_id


def pad_rows(rows: Sequence[CogLMRow], pad_token_id: int) -> dict:
    """Right-pad rows to a batch: pads get ``pad_token_id``, position 0, label -100 and ``attention_mask`` 0."""
    length = max(len(row.input_ids) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        position_ids[i, :n] = torch.tensor(row.position_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": attention_mask,
        "mask_regions": [list(row.mask_regions) for row in rows],
        "labels": labels,
    }


# ------------------------------------------------------------------------------------------------ collators
class _SeededCollator:
    """Shared seeding: a per-sample generator from ``(seed, epoch, index)`` or the collator's own stream."""

    def __init__(self, config: CogLMConfig, seed: int):
        self.config = config
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample_generator(self, feature: dict) -> torch.Generator:
        if "index" not in feature:
            return self.generator
        seed = sample_seed(self.seed, int(feature.get("epoch", 0)), int(feature["index"]))
        return torch.Generator().manual_seed(seed)

    def pick_text(self, feature: dict, generator: torch.Generator) -> list[int]:
        """The caption, or for a bilingual sample one of its two languages (probability ½ each)."""
        if "text_ids" not in feature:
            raise ValueError("every sample needs 'text_ids' (caption ids from CogLMTokenizer)")
        second = feature.get("text_ids_2")
        if second is not None and len(second) and bool(torch.rand(1, generator=generator) < 0.5):
            return _as_text(second, self.config, "text_ids_2")
        return _as_text(feature["text_ids"], self.config)


class CogLMPretrainingCollator(_SeededCollator):
    """Base-stage batches: text→image rows and mask-prediction + captioning rows, mixed by ``caption_ratio``.

    Args:
        config: the model's :class:`CogLMConfig` (ids, grid, position layout).
        caption_ratio: probability of a mask-prediction + captioning row (paper: 0.5; released code: 0.3).
        mask_coverage: fraction of the image grid the 4×4 patches must cover (0.75).
        patch_size: side of the patches (4).
        chinese_piece_start: first sentencepiece id counted as Chinese for the language tag (icetk: 63823).
        text_attention_bias: ``c`` passed to the model. The +1.4 text up-weighting is an inference-time device
            and the official pretraining formats have no bias, so training uses 0; ``None`` keeps the config's value.
        caption_end_token_id: a text id appended to every caption of a captioning row (and predicted), e.g. the
            tokenizer's ``<eos>`` piece, so that captioning learns to stop; ``None`` (default) is the official
            layout, where captions have no end.
        seed: seed of every random choice.

    Returns (``__call__``): ``input_ids``, ``position_ids``, ``attention_mask`` (``[batch, seq]``, 0 on padding),
    ``mask_regions`` (per row, inclusive ``(l, r)``), ``labels`` (-100 except the predicted tokens) and
    ``text_attention_bias`` — the keyword arguments of :meth:`CogLMForMaskedRegions.forward`.
    """

    def __init__(
        self,
        config: CogLMConfig,
        caption_ratio: float = 0.5,
        mask_coverage: float = 0.75,
        patch_size: int = 4,
        chinese_piece_start: int = ICETK_CHINESE_PIECE_START,
        text_attention_bias: float | None = 0.0,
        caption_end_token_id: int | None = None,
        seed: int = 0,
    ):
        super().__init__(config, seed)
        if caption_end_token_id is not None:
            _as_text([caption_end_token_id], config, "caption_end_token_id")
        if not 0.0 <= caption_ratio <= 1.0:
            raise ValueError(f"caption_ratio must be in [0, 1], got {caption_ratio}")
        if not 0 < patch_size <= config.image_grid_size:
            raise ValueError(f"patch_size ({patch_size}) must be in [1, image_grid_size={config.image_grid_size}]")
        if not 0.0 < mask_coverage < 1.0:
            raise ValueError(f"mask_coverage must be in (0, 1), got {mask_coverage}")
        self.caption_ratio = float(caption_ratio)
        self.mask_coverage = float(mask_coverage)
        self.patch_size = int(patch_size)
        self.chinese_piece_start = int(chinese_piece_start)
        self.text_attention_bias = text_attention_bias
        self.caption_end_token_id = caption_end_token_id

    def row(self, feature: dict) -> CogLMRow:
        """Build one row from a sample (random choices from :meth:`sample_generator`)."""
        config = self.config
        if "image_tokens" not in feature:
            raise ValueError("base-stage samples need 'image_tokens' (the stage-1 VQ grid)")
        generator = self.sample_generator(feature)
        image = _as_grid(feature["image_tokens"], config.image_grid_size, "image_tokens", config)
        text = self.pick_text(feature, generator)
        if bool(torch.rand(1, generator=generator) < self.caption_ratio):
            patches = sample_patch_mask(config.image_grid_size, self.patch_size, self.mask_coverage, generator)
            tag = language_token_id(text, config, self.chinese_piece_start)
            return caption_row(image, text, patches, tag, config, self.caption_end_token_id)
        return text_to_image_row(text, image, config)

    def __call__(self, features: Sequence[dict]) -> dict:
        batch = pad_rows([self.row(feature) for feature in features], self.config.pad_token_id or 0)
        if self.text_attention_bias is not None:
            batch["text_attention_bias"] = float(self.text_attention_bias)
        return batch


def pad_text(texts: Sequence[Sequence[int]], length: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (after truncating to ``length``) to ``[batch, T]`` ids and a 0/1 mask, ``T`` = longest kept text."""
    kept = [list(t)[:length] for t in texts]
    width = max(len(t) for t in kept)
    ids = torch.full((len(kept), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(kept), width, dtype=torch.long)
    for i, t in enumerate(kept):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    return ids, mask


class CogLMDirectSRCollator(_SeededCollator):
    """Direct super-resolution batches: caption, low-res grid and hi-res grid of the same image.

    Returns ``input_ids`` / ``attention_mask`` (``[batch, T]`` caption, right-padded, at most
    ``max_text_tokens``), ``low_res_tokens`` ``[batch, g, g]`` and ``labels`` = hi-res tokens ``[batch, G, G]``
    (every cell is predicted in one pass).

    Args:
        config: the DSR model's config (``image_grid_size`` = g, ``hires_grid_size`` = G).
        max_text_tokens: caption tokens kept (default ``sr_text_slots``, what the model accepts).
        seed: seed of the bilingual language choice.
    """

    def __init__(self, config: CogLMConfig, max_text_tokens: int | None = None, seed: int = 0):
        super().__init__(config, seed)
        if not config.hires_grid_size:
            raise ValueError("CogLMDirectSRCollator needs a super-resolution config (hires_grid_size > 0)")
        self.max_text_tokens = int(max_text_tokens or config.sr_text_slots)

    def __call__(self, features: Sequence[dict]) -> dict:
        config = self.config
        texts, low, high = [], [], []
        for feature in features:
            if "image_tokens" not in feature or "hires_tokens" not in feature:
                raise ValueError("direct-SR samples need 'image_tokens' (low-res grid) and 'hires_tokens' (hi-res "
                                 "grid); build the token cache with hires=True")
            generator = self.sample_generator(feature)
            texts.append(self.pick_text(feature, generator))
            low.append(_as_grid(feature["image_tokens"], config.image_grid_size, "image_tokens", config))
            high.append(_as_grid(feature["hires_tokens"], config.hires_grid_size, "hires_tokens", config))
        input_ids, attention_mask = pad_text(texts, self.max_text_tokens, config.pad_token_id or 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "low_res_tokens": torch.stack(low),
            "labels": torch.stack(high),
        }


class CogLMIterativeSRCollator(_SeededCollator):
    """Iterative super-resolution batches: a random fraction of the hi-res cells is replaced by ``<start_of_image>``
    (CogView2's mask token) and predicted.

    Per sample a ratio is drawn uniformly from ``mask_ratios`` ({0.2, 0.4, 0.6, 0.8, 0.9}) and
    ``round(ratio · G²)`` cells, chosen uniformly, are masked (the paper's objective). With probability
    ``lopar_fraction`` a sample instead masks the cells that one LoPAR pass regenerates (pass drawn uniformly from
    ``lopar_order_matrix``): the masks sampling will meet, whose kept cells form a fixed lattice that random masks
    rarely produce. Returns ``input_ids`` / ``attention_mask``
    (caption, at most ``max_text_tokens``), ``image_tokens`` ``[batch, G, G]`` (masked cells = ``boi_token_id``)
    and ``labels`` ``[batch, G, G]`` (original ids at masked cells, -100 elsewhere).
    """

    def __init__(
        self,
        config: CogLMConfig,
        mask_ratios: Sequence[float] = ITERATIVE_SR_MASK_RATIOS,
        max_text_tokens: int | None = None,
        seed: int = 0,
        lopar_fraction: float = 0.0,
        lopar_order_matrix: Sequence[Sequence[int]] = LOPAR_ORDER_MATRIX,
    ):
        super().__init__(config, seed)
        if not config.hires_grid_size:
            raise ValueError("CogLMIterativeSRCollator needs a super-resolution config (hires_grid_size > 0)")
        if not mask_ratios or any(not 0.0 < r <= 1.0 for r in mask_ratios):
            raise ValueError(f"mask_ratios must be a non-empty list of values in (0, 1], got {list(mask_ratios)}")
        if isinstance(lopar_fraction, bool) or not 0.0 <= lopar_fraction <= 1.0:
            raise ValueError(f"lopar_fraction must be a probability in [0, 1], got {lopar_fraction!r}")
        self.mask_ratios = tuple(float(r) for r in mask_ratios)
        self.max_text_tokens = int(max_text_tokens or config.sr_text_slots)
        self.lopar_fraction = float(lopar_fraction)
        side = config.hires_grid_size
        # one mask per pass; passes that regenerate nothing on this grid are left out
        passes = [lopar_regeneration_mask(side, side, t, order_matrix=lopar_order_matrix)
                  for t in range(1, lopar_num_passes(lopar_order_matrix) + 1)]
        self.lopar_masks = [mask for mask in passes if mask.any()]

    def mask_cells(self, generator: torch.Generator) -> torch.Tensor:
        """Bool ``[G, G]``: the cells to predict for one sample."""
        if self.lopar_fraction and float(torch.rand((), generator=generator)) < self.lopar_fraction:
            return self.lopar_masks[int(torch.randint(len(self.lopar_masks), (1,), generator=generator))].clone()
        cells = self.config.num_hires_positions
        ratio = self.mask_ratios[int(torch.randint(len(self.mask_ratios), (1,), generator=generator))]
        count = max(1, round(ratio * cells))
        mask = torch.zeros(cells, dtype=torch.bool)
        mask[torch.randperm(cells, generator=generator)[:count]] = True
        return mask.view(self.config.hires_grid_size, self.config.hires_grid_size)

    def __call__(self, features: Sequence[dict]) -> dict:
        config = self.config
        texts, images, labels = [], [], []
        for feature in features:
            if "hires_tokens" not in feature:
                raise ValueError("iterative-SR samples need 'hires_tokens'; build the token cache with hires=True")
            generator = self.sample_generator(feature)
            texts.append(self.pick_text(feature, generator))
            tokens = _as_grid(feature["hires_tokens"], config.hires_grid_size, "hires_tokens", config)
            masked = self.mask_cells(generator)
            images.append(tokens.masked_fill(masked, config.boi_token_id))
            labels.append(tokens.masked_fill(~masked, IGNORE_INDEX))
        input_ids, attention_mask = pad_text(texts, self.max_text_tokens, config.pad_token_id or 0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "image_tokens": torch.stack(images),
            "labels": torch.stack(labels),
        }


__all__ = [
    "ICETK_CHINESE_PIECE_START",
    "IGNORE_INDEX",
    "ITERATIVE_SR_MASK_RATIOS",
    "CogLMDirectSRCollator",
    "CogLMIterativeSRCollator",
    "CogLMPretrainingCollator",
    "CogLMRow",
    "caption_row",
    "language_token_id",
    "pad_rows",
    "pad_text",
    "patch_regions",
    "sample_patch_mask",
    "sample_seed",
    "text_to_image_row",
]
