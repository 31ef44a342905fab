"""Collators of coglm_hf.training: layouts checked by hand against Eq. 1 / the official pretraining formats, loss counts, seeding, SR batches."""

from __future__ import annotations

import json

import pytest
import torch

from coglm_hf.attention_masks import masked_regions_loss_mask, masked_regions_mask
from coglm_hf.configuration_coglm import CogLMConfig, CogLMDirectSRConfig, CogLMIterativeSRConfig
from coglm_hf.modeling_coglm import CogLMForMaskedRegions
from coglm_hf.sampling import LOPAR_NUM_PASSES, lopar_regeneration_mask
from coglm_hf.training.collators import (
    IGNORE_INDEX,
    ITERATIVE_SR_MASK_RATIOS,
    CogLMDirectSRCollator,
    CogLMIterativeSRCollator,
    CogLMPretrainingCollator,
    caption_row,
    language_token_id,
    patch_regions,
    sample_patch_mask,
    text_to_image_row,
)
from coglm_hf.training.train import CONFIG_DIR


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(name: str = "base", **overrides):
    classes = {"base": CogLMConfig, "dsr": CogLMDirectSRConfig, "itersr": CogLMIterativeSRConfig}
    values = json.loads((CONFIG_DIR / f"tiny_{name}.json").read_text())
    return classes[name](**{**values, **overrides})


def matrix(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


# ---------------------------------------------------------------------------------------------- hand-checked layouts
def test_text_to_image_row_by_hand():
    config = tiny(image_grid_size=2)  # 4 image tokens; <start_of_image> = 197 at position 32
    row = text_to_image_row([70, 71, 72], torch.tensor([[5, 6], [7, 8]]), config)
    assert row.input_ids == [70, 71, 72, 197, 5, 6, 7, 8]
    assert row.position_ids == [0, 1, 2, 32, 33, 34, 35, 36]
    assert row.mask_regions == [(3, 7)]
    # BOI predicts the first image token, ..., the 3rd predicts the 4th; text and BOI are never targets
    assert row.labels == [-100, -100, -100, -100, 5, 6, 7, 8]
    expected = matrix([  # text bidirectional; BOI + image causal and seeing all text
        "11100000",
        "11100000",
        "11100000",
        "11110000",
        "11111000",
        "11111100",
        "11111110",
        "11111111",
    ])
    assert torch.equal(masked_regions_mask(8, row.mask_regions), expected)


def test_caption_row_by_hand():
    """3×3 image, 2×2 patches at (0,0) and (1,1) (7 of 9 cells), caption [80, 81] with the English tag.

    Sequence: 0 1 2 | 3 4 5 | 6 7 8 (image, raster order) | 9 tag | 10 11 caption.
    Patch row runs: (0,1), (3,5), (7,8); caption region (9,11); context = cells 2 and 6.
    """
    config = tiny(image_grid_size=3)
    image = torch.arange(10, 19).view(3, 3)
    patches = torch.zeros(3, 3, dtype=torch.bool)
    patches[0:2, 0:2] = True
    patches[1:3, 1:3] = True
    row = caption_row(image, [80, 81], patches, config.start_of_english_token_id, config)

    assert row.input_ids == [10, 11, 12, 13, 14, 15, 16, 17, 18, 198, 80, 81]
    assert row.position_ids == [33, 34, 35, 36, 37, 38, 39, 40, 41, 0, 1, 2]
    assert row.mask_regions == [(0, 1), (3, 5), (7, 8), (9, 11)]
    # targets: 2nd..last token of each patch row run, and the caption (not the tag)
    assert row.labels == [-100, 11, -100, -100, 14, 15, -100, -100, 18, -100, 80, 81]
    expected = matrix([
        # context cells 2, 6 see only each other; patch tokens see the context + earlier patch tokens (raster);
        # the caption sees the whole image; no image token sees the caption
        "101000100000",  # 0 patch
        "111000100000",  # 1 patch
        "001000100000",  # 2 context
        "111100100000",  # 3 patch
        "111110100000",  # 4 patch
        "111111100000",  # 5 patch
        "001000100000",  # 6 context
        "111111110000",  # 7 patch
        "111111111000",  # 8 patch
        "111111111100",  # 9 tag
        "111111111110",  # 10 caption
        "111111111111",  # 11 caption
    ])
    assert torch.equal(masked_regions_mask(12, row.mask_regions), expected)
    # the model scores exactly the positions whose next label is a target (Eq. 2)
    scored = masked_regions_loss_mask(12, row.mask_regions)
    targets = torch.tensor(row.labels) != IGNORE_INDEX
    assert torch.equal(scored[:-1], targets[1:]) and not targets[0]


def test_patch_regions_merges_runs_within_a_row_only():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert patch_regions(mask) == [(1, 3), (4, 5), (7, 7), (12, 15)]  # row 1's cell 3 and row 3 are separate runs


def test_language_tag_uses_the_configured_split():
    config = tiny()
    assert language_token_id([70, 99], config, chinese_piece_start=40) == config.start_of_english_token_id
    assert language_token_id([70, 104], config, chinese_piece_start=40) == config.start_of_chinese_token_id
    # icetk's default split (63823) makes every id of the tiny vocabulary English
    assert language_token_id([190], config, chinese_piece_start=63823) == config.start_of_english_token_id


# ---------------------------------------------------------------------------------------------- patch sampling
def test_patch_sampling_covers_75_percent_with_whole_patches():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = sample_patch_mask(20, 4, 0.75, generator)
        assert mask.sum() >= 300  # 75 % of 400
        # every covered cell lies in a fully covered 4×4 window
        windows = torch.nn.functional.avg_pool2d(mask[None, None].float(), 4, stride=1)[0, 0] == 1
        union = torch.zeros_like(mask)
        for top, left in windows.nonzero().tolist():
            union[top : top + 4, left : left + 4] = True
        assert torch.equal(union, mask)
    a = sample_patch_mask(20, 4, 0.75, torch.Generator().manual_seed(3))
    b = sample_patch_mask(20, 4, 0.75, torch.Generator().manual_seed(3))
    c = sample_patch_mask(20, 4, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------------------------------------- base collator
def _features(num, config, grid=None, bilingual=False):
    grid = grid or config.image_grid_size
    g = torch.Generator().manual_seed(1)
    features = []
    for i in range(num):
        feature = {"image_tokens": torch.randint(0, config.num_image_tokens, (grid, grid), generator=g),
                   "text_ids": [64 + (i + k) % 100 for k in range(2 + i % 6)], "index": i}
        if bilingual:
            feature["text_ids_2"] = [180, 181, 182]
        features.append(feature)
    return features


def test_pretraining_batch_padding_regions_and_counts():
    config = tiny(image_grid_size=8, max_position_embeddings=128, boi_position_id=40)
    collator = CogLMPretrainingCollator(config, patch_size=2, seed=0)
    batch = collator(_features(16, config))
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == batch["position_ids"].shape == attention.shape
    assert batch["text_attention_bias"] == 0.0
    kinds = set()
    for row, regions in enumerate(batch["mask_regions"]):
        length = int(attention[row].sum())
        assert bool((attention[row, :length] == 1).all()) and bool((attention[row, length:] == 0).all())
        assert bool((ids[row, length:] == config.pad_token_id).all()) and bool((labels[row, length:] == -100).all())
        assert max(r for _, r in regions) == length - 1  # regions never cover padding
        scored = masked_regions_loss_mask(ids.shape[1], regions)
        # region loss count: every scored position has a target label and vice versa
        assert torch.equal(scored[:-1], labels[row, 1:] != IGNORE_INDEX)
        assert int(scored.sum()) == sum(right - left for left, right in regions)
        if ids[row, 0] >= config.text_token_offset:  # text→image: loss on exactly the 64 image tokens
            kinds.add("t2i")
            assert len(regions) == 1 and int(scored.sum()) == 64
        else:  # captioning: ≥ 75 % of the image in patch regions, caption last
            kinds.add("caption")
            covered = sum(right - left + 1 for left, right in regions[:-1])
            assert covered >= 48
            assert int(ids[row, 64]) in (config.start_of_english_token_id, config.start_of_chinese_token_id)
    assert kinds == {"t2i", "caption"}


def test_mixing_ratio_and_bilingual_choice():
    config = tiny()
    features = _features(400, config, bilingual=True)
    rows = [CogLMPretrainingCollator(config, patch_size=2, seed=5).row(f) for f in features]
    caption = sum(row.input_ids[0] < config.text_token_offset for row in rows)
    assert 160 <= caption <= 240  # 0.5 of 400 (±4 σ)
    second = sum(180 in row.input_ids for row in rows)
    assert 160 <= second <= 240  # one language per row, each with probability ½
    only_t2i = CogLMPretrainingCollator(config, caption_ratio=0.0, patch_size=2)
    assert all(only_t2i.row(f).input_ids[0] >= config.text_token_offset for f in features[:20])


def test_per_sample_seeding_is_independent_of_batching_and_changes_with_epoch():
    config = tiny()
    collator = CogLMPretrainingCollator(config, patch_size=2, seed=11)
    features = _features(8, config)
    alone = [collator.row(f) for f in features]
    together = collator(features)
    for i, row in enumerate(alone):
        n = len(row.input_ids)
        assert together["input_ids"][i, :n].tolist() == row.input_ids
        assert together["mask_regions"][i] == row.mask_regions
    later = [collator.row({**f, "epoch": 1}) for f in features]
    assert any(a.mask_regions != b.mask_regions or a.input_ids != b.input_ids for a, b in zip(alone, later))
    other_seed = CogLMPretrainingCollator(config, patch_size=2, seed=12)
    assert any(a.mask_regions != other_seed.row(f).mask_regions for a, f in zip(alone, features))


def test_bad_samples_raise_clear_errors():
    config = tiny()
    collator = CogLMPretrainingCollator(config, patch_size=2)
    image = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="text ids"):
        collator([{"image_tokens": image, "text_ids": [5, 6]}])  # raw sentencepiece ids
    with pytest.raises(ValueError, match="empty"):
        collator([{"image_tokens": image, "text_ids": []}])
    with pytest.raises(ValueError, match="4×4 grid"):
        collator([{"image_tokens": torch.zeros(5, 5, dtype=torch.long), "text_ids": [70]}])
    with pytest.raises(ValueError, match="image ids"):
        collator([{"image_tokens": image + 100, "text_ids": [70]}])
    with pytest.raises(ValueError, match="patch_size"):
        CogLMPretrainingCollator(config, patch_size=5)


def test_model_loss_on_collated_batch_matches_rows_alone():
    """Padding changes nothing: the summed loss of a padded batch is the sum of the rows' losses alone, and equals
    the cross-entropy at the collator's target labels."""
    config = tiny(image_grid_size=4)
    torch.manual_seed(0)
    model = CogLMForMaskedRegions(config).eval()
    collator = CogLMPretrainingCollator(config, patch_size=2, seed=3)
    features = _features(6, config)
    batch = collator(features)
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=1)
        singles = sum(float(model(**collator([f]), num_items_in_batch=1).loss) for f in features)
        log_probs = torch.log_softmax(out.logits[:, :-1].float(), -1)
        targets = batch["labels"][:, 1:]
        manual = -log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][targets != -100].sum()
    assert float(out.loss) == pytest.approx(singles, rel=1e-4)
    assert float(out.loss) == pytest.approx(float(manual), rel=1e-4)


# ---------------------------------------------------------------------------------------------- SR collators
def test_direct_sr_batch():
    config = tiny("dsr")
    g = torch.Generator().manual_seed(0)
    features = [{"image_tokens": torch.randint(0, 64, (4, 4), generator=g),
                 "hires_tokens": torch.randint(0, 64, (12, 12), generator=g),
                 "text_ids": [70 + k for k in range(n)], "index": i} for i, n in enumerate((3, 20, 5))]
    batch = CogLMDirectSRCollator(config)(features)
    assert batch["input_ids"].shape == (3, 16)  # truncated to the 16 text slots
    assert batch["attention_mask"].sum(1).tolist() == [3, 16, 5]
    assert batch["input_ids"][0, 3:].eq(config.pad_token_id).all()
    assert torch.equal(batch["low_res_tokens"][1], features[1]["image_tokens"])
    assert torch.equal(batch["labels"][2], features[2]["hires_tokens"])
    with pytest.raises(ValueError, match="hires_tokens"):
        CogLMDirectSRCollator(config)([{"image_tokens": features[0]["image_tokens"], "text_ids": [70]}])


def test_iterative_sr_mask_ratios_and_labels():
    config = tiny("itersr")
    collator = CogLMIterativeSRCollator(config, seed=0)
    g = torch.Generator().manual_seed(0)
    features = [{"hires_tokens": torch.randint(0, 64, (12, 12), generator=g), "text_ids": [70, 71], "index": i}
                for i in range(60)]
    batch = collator(features)
    allowed = {round(r * 144) for r in ITERATIVE_SR_MASK_RATIOS}
    counts = set()
    for feature, image, labels in zip(features, batch["image_tokens"], batch["labels"]):
        masked = image == config.boi_token_id
        counts.add(int(masked.sum()))
        assert torch.equal(labels[masked], feature["hires_tokens"][masked])
        assert bool((labels[~masked] == IGNORE_INDEX).all())
        assert torch.equal(image[~masked], feature["hires_tokens"][~masked])
    assert counts == allowed  # all five ratios drawn over 60 samples
    again = CogLMIterativeSRCollator(config, seed=0)(features)
    assert torch.equal(again["image_tokens"], batch["image_tokens"])
    with pytest.raises(ValueError, match="mask_ratios"):
        CogLMIterativeSRCollator(config, mask_ratios=[0.0])


def test_iterative_sr_lopar_masks_are_the_cells_a_pass_regenerates():
    config = tiny("itersr")  # 12x12 grid: the official 6x6 order matrix tiles it exactly
    side = config.hires_grid_size
    passes = [lopar_regeneration_mask(side, side, t) for t in range(1, LOPAR_NUM_PASSES + 1)]
    g = torch.Generator().manual_seed(0)
    features = [{"hires_tokens": torch.randint(0, 64, (12, 12), generator=g), "text_ids": [70], "index": i}
                for i in range(80)]
    only_lopar = CogLMIterativeSRCollator(config, seed=0, lopar_fraction=1.0)(features)
    seen = set()
    for feature, image, labels in zip(features, only_lopar["image_tokens"], only_lopar["labels"]):
        masked = image == config.boi_token_id
        matches = [t for t, mask in enumerate(passes, start=1) if torch.equal(masked, mask)]
        assert len(matches) == 1, "every mask is exactly one pass's regeneration set"
        seen.add(matches[0])
        assert torch.equal(labels[masked], feature["hires_tokens"][masked])
        assert bool((labels[~masked] == IGNORE_INDEX).all())
    assert seen == set(range(1, LOPAR_NUM_PASSES + 1))
    mixed = CogLMIterativeSRCollator(config, seed=0, lopar_fraction=0.5)(features)
    lopar_like = sum(any(torch.equal(image == config.boi_token_id, mask) for mask in passes)
                     for image in mixed["image_tokens"])
    assert 20 <= lopar_like <= 60  # about half of 80, the rest random-ratio masks
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="lopar_fraction"):
            CogLMIterativeSRCollator(config, lopar_fraction=bad)
