"""CogLM on tiny random configs: attention implementations, precision, caching, loss, bad input."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from coglm_hf import CogLMConfig, CogLMForMaskedRegions
from coglm_hf.attention_masks import masked_regions_mask, text_to_image_position_ids, text_to_image_regions

TINY = dict(
    vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, num_image_tokens=40, text_token_offset=40, boi_token_id=110,
    start_of_english_token_id=111, start_of_chinese_token_id=112, boi_position_id=40, image_grid_size=4,
    max_text_length=32,
)


def tiny_model(seed=0, **overrides) -> CogLMForMaskedRegions:
    torch.manual_seed(seed)
    model = CogLMForMaskedRegions(CogLMConfig(**{**TINY, **overrides})).eval()
    # perturb LayerNorms so no term hides behind a 1 or a 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def t2i_batch(batch=2, text_length=5, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(40, 110, (batch, text_length), generator=g)
    image = torch.randint(0, 40, (batch, n), generator=g)
    ids = torch.cat([text, torch.full((batch, 1), 110), image], dim=1)
    return ids, text_to_image_position_ids(text_length, n, 40), [text_to_image_regions(text_length, n)] * batch


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def forward_logits(model, ids, positions, regions, implementation):
    model.set_attn_implementation(implementation)
    return model(ids, position_ids=positions, mask_regions=regions, use_cache=False).logits


def test_attention_implementations_agree(model):
    ids, positions, regions = t2i_batch()
    with torch.no_grad():
        eager = forward_logits(model, ids, positions, regions, "eager")
        sdpa = forward_logits(model, ids, positions, regions, "sdpa")
        flex = forward_logits(model, ids, positions, regions, "flex_attention")
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex, eager, atol=1e-5, rtol=1e-5)


def test_backward_agrees_between_eager_and_sdpa():
    ids, positions, regions = t2i_batch()
    grads = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_model()
        model.set_attn_implementation(implementation)
        out = model(ids, position_ids=positions, mask_regions=regions, labels=ids, use_cache=False)
        out.loss.backward()
        grads[implementation] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["sdpa"], grads["eager"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite_and_close(model, dtype):
    ids, positions, regions = t2i_batch()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        reference = model(ids, position_ids=positions, mask_regions=regions, image_logits_only=True).logits
        half = tiny_model().to(dtype)
        logits = half(ids, position_ids=positions, mask_regions=regions, image_logits_only=True).logits
    assert logits.dtype == torch.float32  # image logits are always fp32
    assert torch.isfinite(logits).all()
    tolerance = 0.05 if dtype == torch.float16 else 0.25
    assert (logits - reference).abs().max() < tolerance * reference.abs().max()


def test_text_bias_follows_the_ids_and_can_be_overridden(model):
    ids, positions, regions = t2i_batch()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        default = model(ids, position_ids=positions, mask_regions=regions).logits
        explicit = model(ids, position_ids=positions, mask_regions=regions, text_attention_bias=1.4).logits
        off = model(ids, position_ids=positions, mask_regions=regions, text_attention_bias=0.0).logits
        # the same bias by hand: an explicit visibility mask leaves the bias to the ids too; compare weights
        out = model(ids, position_ids=positions, mask_regions=regions, output_attentions=True)
    torch.testing.assert_close(default, explicit)
    assert (default - off).abs().max() > 1e-3
    # the attention of an image query on a text key is exp(c)× larger than without the bias, up to normalisation
    weights = out.attentions[0][0, 0]  # [q, k] of sample 0, head 0
    row = weights[-1]
    assert row[:5].sum() > 0 and row[5:].sum() > 0
    mask = masked_regions_mask(ids.shape[1], regions[0])
    assert torch.all(weights[~mask] == 0)


def run_cached(model, ids, positions, text_length, cache):
    steps = []
    out = model(ids[:1, : text_length + 1], position_ids=positions[: text_length + 1],
                mask_regions=[text_to_image_regions(text_length, 0)], past_key_values=cache, use_cache=True,
                image_logits_only=True)
    steps.append(out.logits[:, -1].expand(ids.shape[0], -1))
    for t in range(text_length + 1, ids.shape[1]):
        out = model(ids[:, t : t + 1], position_ids=positions[t : t + 1], past_key_values=cache, use_cache=True,
                    image_logits_only=True)
        steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_generation_equals_full_forward(model, cache_kind):
    ids, positions, regions = t2i_batch(batch=3, text_length=5, n=16)
    # same prompt for every row: the prompt cache is encoded at batch 1 and broadcast
    ids[:, :5] = ids[0, :5]
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        full = model(ids, position_ids=positions, mask_regions=regions, image_logits_only=True, use_cache=False).logits
        if cache_kind == "dynamic":
            cache = DynamicCache(config=model.config)
        else:
            cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 3)
        cached = run_cached(model, ids, positions, 5, cache)
    torch.testing.assert_close(cached, full[:, 5:], atol=1e-5, rtol=1e-5)


def test_broadcast_prompt_cache_equals_per_sample_encoding(model):
    ids, positions, _ = t2i_batch(batch=3, text_length=5, n=6)
    ids[:, :5] = ids[0, :5]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        broadcast = run_cached(model, ids, positions, 5, DynamicCache(config=model.config))
        per_sample = torch.cat(
            [run_cached(model, ids[i : i + 1], positions, 5, DynamicCache(config=model.config)) for i in range(3)]
        )
    torch.testing.assert_close(broadcast, per_sample, atol=1e-6, rtol=1e-6)


def test_loss_counts_exactly_the_region_positions(model):
    ids, positions, _ = t2i_batch(batch=2, text_length=4, n=10)
    regions = [[(2, 5), (9, 14)], [(4, 14)]]
    model.set_attn_implementation("sdpa")
    out = model(ids, position_ids=positions, mask_regions=regions, labels=ids, use_cache=False)
    logits = out.logits.float()
    terms = []
    for b, sample_regions in enumerate(regions):
        for left, right in sample_regions:
            for p in range(left, right):
                terms.append(torch.nn.functional.cross_entropy(logits[b, p], ids[b, p + 1]))
    expected = torch.stack(terms).mean()
    assert len(terms) == (3 + 5) + 10
    torch.testing.assert_close(out.loss, expected)
    # the Trainer's normalisation: sum / num_items_in_batch
    out_sum = model(ids, position_ids=positions, mask_regions=regions, labels=ids, use_cache=False,
                    num_items_in_batch=36)
    torch.testing.assert_close(out_sum.loss, expected * len(terms) / 36)


def test_seeded_runs_are_reproducible():
    ids, positions, regions = t2i_batch()
    a = tiny_model(seed=3)(ids, position_ids=positions, mask_regions=regions).logits
    b = tiny_model(seed=3)(ids, position_ids=positions, mask_regions=regions).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ids, pos: (ids.clone().index_fill_(1, torch.tensor([0]), 500), pos), "vocab_size"),
        (lambda ids, pos: (ids.clone().index_fill_(1, torch.tensor([0]), -1), pos), "placeholders"),
        (lambda ids, pos: (ids, pos.clone().index_fill_(0, torch.tensor([3]), 64)), "position_ids"),
        (lambda ids, pos: (ids, pos[:-1]), "must match"),
    ],
)
def test_bad_inputs_are_clear_errors(model, change, message):
    ids, positions, regions = t2i_batch()
    ids, positions = change(ids, positions)
    with pytest.raises(ValueError, match=message):
        model(ids, position_ids=positions, mask_regions=regions)


def test_bad_regions_and_lengths(model):
    ids, positions, _ = t2i_batch()
    with pytest.raises(ValueError, match="non-overlapping"):
        model(ids, position_ids=positions, mask_regions=[[(1, 5), (5, 8)]] * 2)
    with pytest.raises(ValueError, match="one list"):
        model(ids, position_ids=positions, mask_regions=[[(1, 5)]])
    long_ids = torch.zeros(1, 65, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the model allows"):
        model(long_ids)


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        CogLMConfig(**{**TINY, "num_attention_heads": 5})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        CogLMConfig(**{**TINY, "max_position_embeddings": 50})
    with pytest.raises(ValueError, match="odd"):
        CogLMConfig(**{**TINY, "local_window": (8, 5)})
    with pytest.raises(ValueError, match="text_token_offset"):
        CogLMConfig(**{**TINY, "text_token_offset": 10})


def test_checkpoint_that_does_not_match_the_config(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    with pytest.raises((RuntimeError, ValueError), match="mismatched_sizes|size mismatch"):
        CogLMForMaskedRegions.from_pretrained(tmp_path / "m", hidden_size=64, num_attention_heads=4,
                                              intermediate_size=64)


def test_save_and_reload_keeps_tied_head(tmp_path, model):
    model.save_pretrained(tmp_path / "m")
    loaded = CogLMForMaskedRegions.from_pretrained(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.word_embeddings.weight.data_ptr()
    ids, positions, regions = t2i_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, position_ids=positions, mask_regions=regions).logits,
                                   model(ids, position_ids=positions, mask_regions=regions).logits)
