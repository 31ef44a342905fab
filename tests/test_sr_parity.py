"""Parity of the converted super-resolution models with numbers computed by the official CogView2 code.

Fixture: ``../shared/fixtures/cogview2_reference`` (README: every rule and tolerance). The inputs are rebuilt from
the raw case inputs (text ids, low-res / current tokens) by the models' own layout code and checked against the
stored official layouts before any logit is compared.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from coglm_hf.attention_masks import text_to_image_position_ids, text_to_image_regions
from coglm_hf.convert_sat import load_converted_model
from coglm_hf.local_attention import get_local_attention_backend, set_local_attention_backend
from coglm_hf.modeling_coglm_sr import direct_sr_level0_visibility
from coglm_hf.sampling import cluster_sample, lopar_regeneration_mask, top_k_sample

ATOL = RTOL = 1e-4
DSR_CASES = ["dsr_t9", "dsr_t95_b2"]
ITERSR_CASES = ["itersr_t16_pass1_b2", "itersr_t5_pass4"]


@pytest.fixture(scope="module")
def dsr(cogview2_fixture_dir):
    model, kind = load_converted_model(cogview2_fixture_dir / "checkpoints" / "cogview2-dsr")
    assert kind == "dsr"
    return model


@pytest.fixture(scope="module")
def itersr(cogview2_fixture_dir):
    model, kind = load_converted_model(cogview2_fixture_dir / "checkpoints" / "cogview2-itersr")
    assert kind == "itersr"
    return model


@pytest.fixture
def local_backend():
    """Select a local-attention backend for one test and restore the previous one afterwards."""
    previous = get_local_attention_backend()
    yield set_local_attention_backend
    set_local_attention_backend(previous)


def load_case(fixture_dir, name):
    return load_file(fixture_dir / "cases" / f"{name}.safetensors")


@torch.no_grad()
def all_position_logits(model, hidden_states, case, chunk=1024):
    """Image logits at every layout position, reduced chunk by chunk to what the case stores (bounded memory)."""
    stats = {"subset": [], "logsumexp": [], "max": [], "argmax": []}
    for start in range(0, hidden_states.shape[1], chunk):
        logits = model.image_logits(hidden_states[:, start : start + chunk])
        stats["subset"].append(logits[..., case["subset_ids"]])
        stats["logsumexp"].append(logits.logsumexp(-1))
        max_logit, argmax = logits.max(-1)
        stats["max"].append(max_logit)
        stats["argmax"].append(argmax)
    stats = {key: torch.cat(value, dim=1) for key, value in stats.items()}
    stats["selected"] = model.image_logits(hidden_states[:, case["selected_positions"]])
    return stats


def check_against_case(stats, case):
    torch.testing.assert_close(stats["selected"], case["logits_selected"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(stats["subset"], case["logits_subset"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(stats["logsumexp"], case["logsumexp"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(stats["max"], case["max_logit"], atol=ATOL, rtol=RTOL)
    decisive = case["top2_gap"] > 1e-3
    assert decisive.float().mean() > 0.99
    assert torch.equal(stats["argmax"][decisive], case["argmax"][decisive])


def run_dsr(model, case):
    """Public forward on the raw inputs; returns the output and the layout it built."""
    text, low_res = case["text_ids"], case["lowres_ids"]
    layout = model.prepare_layout(text, None, low_res)
    assert torch.equal(layout.input_ids, case["input_ids"])
    assert torch.equal(layout.position_ids, case["position_ids"].expand_as(layout.position_ids))
    visible = direct_sr_level0_visibility(layout.text_mask, model.config.num_image_positions)
    assert torch.equal(visible, case["attention_mask_level0"].bool().expand_as(visible))
    grid = model.config.image_grid_size
    with torch.no_grad():
        out = model(input_ids=text, low_res_tokens=low_res.view(-1, grid, grid), output_hidden_states=True)
    return out


def run_itersr(model, case):
    text, image = case["text_ids"], case["image_ids_in"]
    masked = image == model.mask_token_id
    assert torch.equal(masked, case["regenerate_mask"].bool().expand_as(masked))
    layout = model.prepare_layout(text, None, image)
    assert torch.equal(layout.input_ids, case["input_ids"])
    assert torch.equal(layout.position_ids, case["position_ids"].expand_as(layout.position_ids))
    assert torch.equal(layout.text_mask, case["text_key_mask"].bool().expand_as(layout.text_mask))
    with torch.no_grad():
        out = model(input_ids=text, image_tokens=image, output_hidden_states=True)
    return out


@pytest.mark.parametrize("name", DSR_CASES)
def test_direct_sr_matches_official(dsr, cogview2_fixture_dir, name):
    case = load_case(cogview2_fixture_dir, name)
    out = run_dsr(dsr, case)
    final = out.hidden_states[-1]  # after the final LayerNorm, all 4096 layout positions
    assert final.shape[1] == 4096 and out.logits.shape == (case["text_ids"].shape[0], 3600, 20000)
    assert out.logits.dtype == torch.float32
    # the public logits are exactly the hi-res rows of the layout (cell j ↔ position 496 + j)
    torch.testing.assert_close(out.logits, dsr.image_logits(final[:, 496:]), atol=0, rtol=0)
    check_against_case(all_position_logits(dsr, final, case), case)


@pytest.mark.parametrize("name", ITERSR_CASES)
def test_iterative_sr_matches_official(itersr, cogview2_fixture_dir, name):
    case = load_case(cogview2_fixture_dir, name)
    out = run_itersr(itersr, case)
    final = out.hidden_states[-1]
    assert final.shape[1] == 3616 and out.logits.shape == (case["text_ids"].shape[0], 3600, 20000)
    torch.testing.assert_close(out.logits, itersr.image_logits(final[:, 16:]), atol=0, rtol=0)
    check_against_case(all_position_logits(itersr, final, case), case)


def test_padding_side_does_not_matter(dsr, itersr, cogview2_fixture_dir):
    """Right-padded or left-padded prompts give the official (left-padded) result."""
    case = load_case(cogview2_fixture_dir, "itersr_t5_pass4")
    text = case["text_ids"]
    right_padded = torch.cat([text, torch.full((1, 3), 7)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        logits = itersr(input_ids=right_padded, attention_mask=mask, image_tokens=case["image_ids_in"]).logits
    image = case["selected_positions"] >= 16
    torch.testing.assert_close(logits[:, case["selected_positions"][image] - 16], case["logits_selected"][:, image],
                               atol=ATOL, rtol=RTOL)

    case = load_case(cogview2_fixture_dir, "dsr_t9")
    text = case["text_ids"]
    left_padded = torch.cat([torch.full((1, 4), 3), text], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], dim=1).long()
    with torch.no_grad():
        logits = dsr(input_ids=left_padded, attention_mask=mask, low_res_tokens=case["lowres_ids"]).logits
    hires = case["selected_positions"] >= 496
    torch.testing.assert_close(logits[:, case["selected_positions"][hires] - 496], case["logits_selected"][:, hires],
                               atol=ATOL, rtol=RTOL)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("backend", ["flex", "kernel"])
def test_local_attention_backend_does_not_change_outputs(dsr, itersr, cogview2_fixture_dir, local_backend, backend):
    """The torch and flex (and, where a kernel is configured, kernel) local-attention paths give the same SR
    logits, which match the official numbers."""
    try:
        local_backend(backend)
    except RuntimeError as error:
        pytest.skip(f"local attention backend {backend!r} unavailable here: {error}")
    cases = {"dsr_t9": (dsr, run_dsr, 496), "itersr_t5_pass4": (itersr, run_itersr, 16)}
    for name, (model, run, offset) in cases.items():
        case = load_case(cogview2_fixture_dir, name)
        local_backend(backend)
        logits = run(model, case).logits
        local_backend("torch")
        reference = run(model, case).logits
        torch.testing.assert_close(logits[..., case["subset_ids"]], reference[..., case["subset_ids"]], atol=1e-5,
                                   rtol=1e-5)
        image = case["selected_positions"] >= offset
        selected = logits[:, case["selected_positions"][image] - offset]
        torch.testing.assert_close(selected, case["logits_selected"][:, image], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logits[..., case["subset_ids"]], case["logits_subset"][:, offset:], atol=ATOL,
                                   rtol=RTOL)


def test_deterministic_end_to_end(dsr, itersr, cogview2_fixture_dir):
    """e2e_L20: stage 1 (400 cached steps), direct SR, 6 LoPAR passes, all with the argmax rules of the fixture,
    reproduce every stored token exactly."""
    case = load_case(cogview2_fixture_dir, "e2e_L20")
    labels = torch.from_numpy(np.load(cogview2_fixture_dir / "cluster_label.npy", allow_pickle=False))
    coglm, kind = load_converted_model(cogview2_fixture_dir / "checkpoints" / "coglm")
    assert kind == "coglm"
    config = coglm.config
    text = case["text_ids"]
    text_length, cells = text.shape[1], config.num_image_positions

    # stage 1: text + <start_of_image> prefilled once, then one cached step per image token
    positions = text_to_image_position_ids(text_length, cells, config.boi_position_id)
    sequence = torch.cat([text, torch.tensor([[config.boi_token_id]])], dim=1)
    cache = DynamicCache(config=config)
    tokens = []
    with torch.no_grad():
        out = coglm(sequence, position_ids=positions[: text_length + 1], past_key_values=cache, use_cache=True,
                    mask_regions=[text_to_image_regions(text_length, 0)], image_logits_only=True)
        for step in range(cells):
            token = cluster_sample(out.logits[:, -1], labels, temperature=1.15, top_k_clusters=1,
                                   cluster_temperature=0)
            tokens.append(token)
            if step + 1 < cells:
                index = text_length + 1 + step
                out = coglm(token[:, None], position_ids=positions[index : index + 1], past_key_values=cache,
                            use_cache=True, image_logits_only=True)
    stage1 = torch.stack(tokens, dim=1)
    assert torch.equal(stage1, case["stage1_tokens"])

    # direct SR: every hi-res cell with the cluster rule at temperature 1.0
    with torch.no_grad():
        logits = dsr(input_ids=text, low_res_tokens=stage1).logits
    current = cluster_sample(logits, labels, temperature=1.0, top_k_clusters=1, cluster_temperature=0)
    del logits
    assert torch.equal(current, case["dsr_tokens"])

    # iterative SR: the first 16 prompt ids (what the official pipeline passes), 6 LoPAR passes with top-1
    grid, slots = itersr.config.hires_grid_size, itersr.config.sr_text_slots
    assert torch.equal(text[:, :slots], case["itersr_text_ids"])
    changed = []
    for index in range(6):
        regenerate = lopar_regeneration_mask(grid, grid, index + 1).flatten()[None]
        masked = torch.where(regenerate, itersr.mask_token_id, current)
        with torch.no_grad():  # logits of the regenerated cells only (what a LoPAR pass samples)
            logits = itersr(input_ids=text[:, :slots], image_tokens=masked, masked_logits_only=True).logits
        updated = current.clone()
        updated[regenerate.expand_as(current)] = top_k_sample(logits, top_k=1)
        changed.append(int((updated != current).sum()))
        current = updated
        assert torch.equal(current, case["itersr_tokens"][index]), f"LoPAR pass {index + 1}"
    assert torch.equal(current, case["final_tokens"])
    assert changed == [2300, 86, 66, 60, 30, 6]
