"""Parity of the converted base model with numbers computed by the official CogView2 code (fixture README)."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from safetensors.torch import load_file
from transformers import DynamicCache

from coglm_hf import CogLMForMaskedRegions
from coglm_hf.attention_masks import masked_regions_mask, text_to_image_position_ids, text_to_image_regions

ATOL = RTOL = 1e-4
T2I_CASES = ["t2i_L7_n400", "t2i_L23_n57_b2", "t2i_L109_n16"]


@pytest.fixture(scope="module")
def coglm(cogview2_fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "coglm"
    script = REPO_ROOT / "conversion" / "convert_sat_checkpoint.py"
    result = subprocess.run(
        [sys.executable, str(script), "--input", str(cogview2_fixture_dir / "checkpoints" / "coglm"), "--output", str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return CogLMForMaskedRegions.from_pretrained(out, dtype=torch.float32).eval()


def load_case(fixture_dir, name):
    return load_file(fixture_dir / "cases" / f"{name}.safetensors")


def check_image_logits(logits, case):
    torch.testing.assert_close(logits[:, case["selected_positions"]], case["logits_selected"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits[..., case["subset_ids"]], case["logits_subset"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits.logsumexp(-1), case["logsumexp"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits.max(-1).values, case["max_logit"], atol=ATOL, rtol=RTOL)
    decisive = case["top2_gap"] > 1e-3
    assert torch.equal(logits.argmax(-1)[decisive], case["argmax"][decisive])


def t2i_inputs(case):
    text_length = int((case["log_attention_weights_cols"] != 0).sum())
    batch, seq = case["input_ids"].shape
    n = seq - text_length - 1
    # our layout code reproduces the stored inputs
    assert torch.equal(text_to_image_position_ids(text_length, n), case["position_ids"])
    mask = masked_regions_mask(seq, text_to_image_regions(text_length, n))
    assert torch.equal(mask, case["attention_mask"].bool())
    assert torch.allclose(case["log_attention_weights_cols"][:text_length], torch.tensor(1.4))
    return text_length, n, batch


@pytest.mark.parametrize("name", T2I_CASES)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_text_to_image_logits(coglm, cogview2_fixture_dir, name, implementation):
    case = load_case(cogview2_fixture_dir, name)
    text_length, n, batch = t2i_inputs(case)
    coglm.set_attn_implementation(implementation)
    with torch.no_grad():
        # the text bias follows from the ids: no argument beyond positions and the region
        logits = coglm(
            case["input_ids"], position_ids=case["position_ids"],
            mask_regions=[text_to_image_regions(text_length, n)] * batch, image_logits_only=True, use_cache=False,
        ).logits
    assert logits.dtype == torch.float32 and logits.shape[-1] == 20000
    check_image_logits(logits, case)


@pytest.mark.parametrize("name", T2I_CASES)
def test_cached_steps_match_official(coglm, cogview2_fixture_dir, name):
    case = load_case(cogview2_fixture_dir, name)
    text_length, n, batch = t2i_inputs(case)
    ids, positions = case["input_ids"], case["position_ids"]
    coglm.set_attn_implementation("sdpa")
    cache = DynamicCache(config=coglm.config)
    steps = []
    with torch.no_grad():
        # prompt once at batch 1, broadcast to the batch by the model
        out = coglm(ids[:1, : text_length + 1], position_ids=positions[: text_length + 1],
                    mask_regions=[text_to_image_regions(text_length, 0)], past_key_values=cache, use_cache=True,
                    image_logits_only=True)
        steps.append(out.logits[:, -1].expand(batch, -1))
        for t in range(text_length + 1, ids.shape[1]):
            out = coglm(ids[:, t : t + 1], position_ids=positions[t : t + 1], past_key_values=cache, use_cache=True,
                        image_logits_only=True)
            steps.append(out.logits[:, -1])
    cached = torch.stack(steps, dim=1)  # logits at positions L … S-1
    selected = case["selected_positions"]
    keep = selected >= text_length
    torch.testing.assert_close(cached[:, selected[keep] - text_length], case["logits_selected"][:, keep],
                               atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cached[..., case["subset_ids"]], case["logits_subset"][:, text_length:],
                               atol=ATOL, rtol=RTOL)


def test_caption_scores(coglm, cogview2_fixture_dir):
    case = load_case(cogview2_fixture_dir, "score_b3_c6")
    ids = case["input_ids"]
    assert int(ids[0, 400]) == coglm.config.start_of_chinese_token_id
    scores = coglm.score_captions(ids[:, :400], ids[:, 401:])
    torch.testing.assert_close(scores, case["score"], atol=1e-4, rtol=0)

    # the individual terms, from a plain forward with the same layout (no text bias)
    seq = ids.shape[1]
    with torch.no_grad():
        logits = coglm(ids, position_ids=case["position_ids"], mask_regions=[[(400, seq - 1)]] * 3,
                       text_attention_bias=0.0, use_cache=False).logits.float()
    terms = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    terms = terms * case["loss_mask"][1:].to(terms.dtype)
    torch.testing.assert_close(terms, case["token_logprob"], atol=1e-4, rtol=0)
    # Eq. 1 layout for scoring equals the stored mask
    assert torch.equal(masked_regions_mask(seq, [(400, seq - 1)]), case["attention_mask"].bool())
