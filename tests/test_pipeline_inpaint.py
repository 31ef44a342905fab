"""CogView2InpaintPipeline (text-guided editing, the official cogview2_completion.py) on the tiny random pipeline of
test_pipeline_cogview2.py: only masked cells change, the stage-1 ordering and mask follow the official layout,
masks in every format, bad input."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from test_pipeline_cogview2 import DETERMINISTIC, HIGH, LOW, build_tiny_pipeline, seeded, single_thread  # noqa: F401
from test_pipeline_cogview2 import spm_model as spm_model  # noqa: F401  (fixture)

from coglm_hf.pipeline_cogview2 import CogView2Pipeline
from coglm_hf.pipeline_cogview2_inpaint import CogView2InpaintPipeline, edit_order
from coglm_hf.sampling import cluster_sample

BOX = (0.3, 0.25, 0.7, 0.65)  # 38×38 px of the 96-px image → a 54-px crop, larger than 32 px: super-resolution runs
SMALL_BOX = (0.4, 0.4, 0.55, 0.55)  # 14 px → a 20-px crop: stage 1 only


@pytest.fixture(scope="module")
def pipe(spm_model):  # noqa: F811
    return build_tiny_pipeline(spm_model, pipeline_cls=CogView2InpaintPipeline)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, size=(100, 120, 3), dtype=np.uint8))  # 120 wide, 100 high


def record(calls):
    def callback(p, step, stage, kwargs):
        calls.append((stage, step, kwargs["image_tokens"].clone(), kwargs.get("sample_indices")))
        return {}

    return callback


def test_edit_changes_only_masked_cells(pipe, image):
    edit = pipe.prepare_edit(image, mask_box=BOX)
    assert edit.image.shape == (1, 3, 96, 96) and edit.high_res_tokens is not None
    calls = []
    out = pipe("a red cat", image=image, mask_box=BOX, num_images_per_prompt=3, generator=seeded(), style="none",
               output_type="tokens", stage1_batch_size=2, sr_batch_size=2, callback_on_step_end=record(calls),
               callback_on_step_end_tensor_inputs=["image_tokens", "sample_indices"])
    assert out.images.shape == (3, HIGH, HIGH)

    num_generated = int(edit_order(edit.low_res_mask)[1].numel())
    low_final = torch.cat([grid for stage, step, grid, _ in calls if stage == "stage1" and step == num_generated - 1])
    original = edit.low_res_tokens.expand(3, -1, -1)
    outside = ~edit.low_res_mask.expand(3, -1, -1)
    assert low_final.shape == (3, LOW, LOW) and bool((low_final >= 0).all())
    torch.testing.assert_close(low_final[outside], original[outside], rtol=0, atol=0)
    assert bool((low_final != original)[~outside].any())

    high_final = torch.cat([grid for stage, step, grid, _ in calls if stage == "itersr" and step == 5])
    original = edit.high_res_tokens.expand(3, -1, -1)
    outside = ~edit.high_res_mask.expand(3, -1, -1)
    torch.testing.assert_close(high_final[outside], original[outside], rtol=0, atol=0)
    assert bool((high_final != original)[~outside].any())
    dsr = torch.cat([grid for stage, _, grid, _ in calls if stage == "dsr"])
    torch.testing.assert_close(dsr[outside], original[outside], rtol=0, atol=0)

    images = pipe("a red cat", image=image, mask_box=BOX, generator=seeded(), output_type="np").images
    assert images.shape == (1, 96, 96, 3) and np.isfinite(images).all()


def test_edit_ordering_and_stage1_layout(pipe, image):
    """The cached editing run equals one uncached pass over the official completion sequence: [text, <start_of_image>,
    context tokens, generation segment] with true position ids and the official mask."""
    edit = pipe.prepare_edit(image, mask_box=BOX)
    mask = edit.low_res_mask
    # ordering rule, written out independently: masked cells and their unmasked left neighbours, raster order
    expected_generation = [i * LOW + j for i in range(LOW) for j in range(LOW)
                           if mask[i, j] or (j + 1 < LOW and mask[i, j + 1])]
    context, generation = edit_order(mask)
    assert generation.tolist() == expected_generation
    assert sorted(context.tolist() + generation.tolist()) == list(range(LOW * LOW))

    calls = []
    prompt_ids = pipe.tokenizer.encode_prompt("a red cat", style="none")
    pipe(prompt_ids=prompt_ids, image=image, mask_box=BOX, output_type="tokens", callback_on_step_end=record(calls),
         **DETERMINISTIC)
    final = [grid for stage, step, grid, _ in calls if stage == "stage1"][-1].view(-1)

    config = pipe.base_model.config
    text = prompt_ids[:-1]
    length, num_context = len(text), context.numel()
    ids = torch.tensor(text + [config.boi_token_id] + final[context].tolist() + final[generation].tolist())[None]
    positions = torch.tensor(list(range(length)) + [config.boi_position_id]
                             + (config.boi_position_id + 1 + torch.cat([context, generation])).tolist())
    size = ids.shape[1]
    row, col = torch.arange(size)[:, None], torch.arange(size)[None]
    start = length + 1
    visible = (col <= row) | ((row < length) & (col < length)) | (
        (row >= start) & (col >= start) & (col < start + num_context))
    with torch.no_grad():
        logits = pipe.base_model(ids, position_ids=positions, attention_mask=visible[None],
                                 image_logits_only=True).logits[0]
    # the pipeline's cached prefill and steps give the same logits as the uncached official pass
    cache, cached = pipe.prefill(text, final[context], context)
    torch.testing.assert_close(cached[0], logits[start + num_context - 1], atol=1e-4, rtol=1e-4)
    for k, cell in enumerate(generation.tolist()[:-1]):
        with torch.no_grad():
            cached = pipe.base_model(final[cell].view(1, 1), position_ids=positions[start + num_context + k :][:1],
                                     past_key_values=cache, use_cache=True, image_logits_only=True).logits
        torch.testing.assert_close(cached[0, -1], logits[start + num_context + k], atol=1e-4, rtol=1e-4)
    labels = pipe.scheduler.cluster_labels
    for k, cell in enumerate(generation.tolist()):
        if mask.view(-1)[cell]:
            predicted = cluster_sample(logits[start + num_context + k - 1], labels, temperature=1.15, top_k_clusters=1,
                                       cluster_temperature=0)
            assert int(predicted) == int(final[cell]), f"generation slot {k} (cell {cell})"
        else:
            assert int(final[cell]) == int(edit.low_res_tokens.view(-1)[cell])  # teacher-forced real token


def test_small_region_skips_super_resolution(pipe, image):
    edit = pipe.prepare_edit(image, mask_box=SMALL_BOX)
    assert edit.high_res_tokens is None and edit.crop[2] <= 32
    calls = []
    out = pipe("a cat", image=image, mask_box=SMALL_BOX, generator=seeded(), output_type="pt",
               callback_on_step_end=record(calls))
    assert {stage for stage, *_ in calls} == {"stage1"}
    assert out.images.shape == (1, 3, 96, 96)


def test_mask_formats_agree(pipe, image):
    array = np.zeros((100, 120), dtype=bool)
    array[30:70, 40:90] = True
    masks = [
        PIL.Image.fromarray(array.astype(np.uint8) * 255),
        PIL.Image.fromarray(array.astype(np.uint8) * 255).convert("RGB"),
        array,
        array.astype(np.uint8) * 255,
        array[..., None],
        torch.from_numpy(array).float()[None],
        torch.from_numpy(array),
    ]
    reference = pipe.prepare_edit(image, mask_image=masks[0])
    assert reference.mask.shape == (96, 96) and bool(reference.mask.any())
    for mask in masks[1:]:
        edit = pipe.prepare_edit(image, mask_image=mask)
        assert torch.equal(edit.mask, reference.mask) and edit.crop == reference.crop
        assert torch.equal(edit.low_res_tokens, reference.low_res_tokens)
    # a mask covering the whole image edits the whole image
    whole = pipe.prepare_edit(image, mask_image=np.ones((100, 120), dtype=bool))
    assert whole.crop == (0, 0, 96) and bool(whole.low_res_mask.all())


def test_bad_edit_inputs(pipe, image):
    empty = np.zeros((100, 120), dtype=bool)
    cases = [
        (dict(prompt="a cat", image=image), ValueError, "exactly one of mask_image"),
        (dict(prompt="a cat", image=image, mask_box=BOX, mask_image=empty), ValueError, "exactly one"),
        (dict(prompt="a cat", image=image, mask_image=empty), ValueError, "selects nothing"),
        (dict(prompt="a cat", image=image, mask_image=np.ones((50, 50), dtype=bool)), ValueError, "same size"),
        (dict(prompt="a cat", image=image, mask_image=np.ones((2, 100, 120))), ValueError, "mask_image must be"),
        (dict(prompt="a cat", image=image, mask_image="mask.png"), TypeError, "mask_image must be"),
        (dict(prompt="a cat", image=image, mask_box=(0.5, 0.5, 0.4, 0.9)), ValueError, "top < bottom"),
        (dict(prompt="a cat", image=image, mask_box=(0.1, 0.2, 0.3)), ValueError, "four numbers"),
        (dict(prompt="a cat", mask_box=BOX), ValueError, "image is required"),
        (dict(prompt="a cat", image="photo.png", mask_box=BOX), TypeError, "image must be"),
        (dict(prompt=["a cat", "a dog"], image=image, mask_box=BOX), ValueError, "one prompt per call"),
        (dict(prompt_ids=[[70, 71], [72]], image=image, mask_box=BOX), ValueError, "one id list"),
        (dict(prompt="", image=image, mask_box=BOX), ValueError, "empty"),
        (dict(prompt="a cat", image=image, mask_box=BOX, style="cubism"), ValueError, "Unknown style"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            pipe(**kwargs)
    no_vq = CogView2InpaintPipeline(**dict(pipe.components, image_tokenizer=None))
    with pytest.raises(ValueError, match="image_tokenizer"):
        no_vq("a cat", image=image, mask_box=BOX)


def test_from_pipe_shares_components(pipe):
    text2image = CogView2Pipeline.from_pipe(pipe)
    assert isinstance(text2image, CogView2Pipeline)
    for name, component in pipe.components.items():
        assert getattr(text2image, name) is component
    back = CogView2InpaintPipeline.from_pipe(text2image, tokenizer=None)
    assert back.tokenizer is None and back.base_model is pipe.base_model
    with pytest.raises(TypeError, match="unexpected"):
        CogView2InpaintPipeline.from_pipe(text2image, guidance_scale=3)
