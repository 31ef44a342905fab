"""CogLM behaves like an in-library Transformers model: config and output flags, standard 4D masks, cache editing,
static cache + torch.compile in generate, packed batches, shift_labels (tiny random configs)."""

import pytest
import torch
import torch.nn.functional as F
from test_modeling_coglm import TINY, t2i_batch, tiny_model
from transformers import DynamicCache, StaticCache
from transformers.generation import CompileConfig

from coglm_hf import CogLMConfig, CogLMForMaskedRegions
from coglm_hf.attention_masks import masked_regions_mask
from coglm_hf.modeling_coglm import CogLMDynamicCacheLayer, CogLMStaticCacheLayer, text_key_record_layer

GREEDY = dict(do_sample=False, max_new_tokens=6, pad_token_id=0)


@pytest.fixture(scope="module")
def model():
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    return model


def prompts(batch=2, seed=0):
    """Text prompts ending with <start_of_image> (id 110); text ids get the text bias."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(40, 110, (batch, 4), generator=g), torch.full((batch, 1), 110)], dim=1)


# ------------------------------------------------------------------------------------------- (4) config, outputs
def test_config_declares_generation_ids_and_output_flags(tmp_path):
    config = CogLMConfig(**TINY)
    assert config.bos_token_id is None and config.eos_token_id is None  # CogView2 has neither
    config = CogLMConfig(**TINY, eos_token_id=7, output_hidden_states=True)
    config.save_pretrained(tmp_path)
    loaded = CogLMConfig.from_pretrained(tmp_path)
    assert loaded.eos_token_id == 7 and loaded.output_hidden_states


def test_output_flags_come_from_the_config_and_return_dict_false_gives_tuples():
    model = tiny_model(output_hidden_states=True, output_attentions=True)
    model.set_attn_implementation("eager")
    ids = prompts()
    out = model(ids)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert len(out.attentions) == TINY["num_hidden_layers"] and out.attentions[0].shape == (2, 4, 5, 5)
    assert model(ids, output_hidden_states=False, output_attentions=False).hidden_states is None

    model = tiny_model()
    reference = model(ids, labels=ids)
    as_tuple = model(ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], reference.loss)
    torch.testing.assert_close(as_tuple[1], reference.logits)
    base = model.transformer(ids, return_dict=False, use_cache=False)
    assert isinstance(base, tuple)
    torch.testing.assert_close(base[0], model.transformer(ids).last_hidden_state)
    model.config.return_dict = False
    try:
        assert isinstance(model(ids), tuple)
    finally:
        model.config.return_dict = True


def test_inputs_embeds_in_forward_and_generate(model):
    ids = prompts()
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        reference = model(ids).logits
        # with the ids alongside, the text bias sees the same text keys
        torch.testing.assert_close(model(inputs_embeds=embeds, input_ids=ids).logits, reference)
        # embeddings alone: no key counts as text, which equals turning the bias off
        torch.testing.assert_close(model(inputs_embeds=embeds).logits,
                                   model(ids, text_attention_bias=0.0).logits)
    generated = model.generate(ids, **GREEDY)
    from_embeds = model.generate(input_ids=ids, inputs_embeds=embeds, **GREEDY)
    assert torch.equal(from_embeds[:, -6:], generated[:, -6:])
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=embeds[..., :8])


# ------------------------------------------------------------------------------------------- (2) standard 4D masks
def reference_first_layer_weights(model, ids, positions, additive):
    """Attention probabilities of layer 0 by hand: softmax(q·kᵀ/√d + c·[key is text] + additive)."""
    transformer = model.transformer
    attention = transformer.layers[0].attention
    hidden = transformer.embed(ids, positions[None].expand(ids.shape[0], -1))
    query, key, _ = attention.project_qkv(transformer.layers[0].input_layernorm(hidden))
    scores = (query * attention.scaling) @ key.transpose(-1, -2)
    text = model.config.is_text_token(ids)[:, None, None, :].float() * model.config.text_attention_bias
    return torch.softmax(scores + text + additive[:, None], dim=-1)


@pytest.mark.parametrize("convention", ["float_additive", "bool"])
def test_4d_masks_follow_transformers_conventions(convention):
    model = tiny_model()
    model.set_attn_implementation("eager")
    ids, positions, regions = t2i_batch(batch=2, text_length=5, n=10)
    seq = ids.shape[1]
    visible = masked_regions_mask(seq, regions[0])[None].expand(2, -1, -1).clone()
    visible[1, :, 2] = False  # a per-sample difference
    g = torch.Generator().manual_seed(0)
    extra = torch.randn(2, seq, seq, generator=g) * 0.5  # non-zero additive values must be added, not read as 0/1
    if convention == "float_additive":
        mask = torch.where(visible, extra, torch.finfo(torch.float32).min)[:, None]
        additive = torch.where(visible, extra, torch.tensor(float("-inf")))
    else:
        mask = visible[:, None]
        additive = torch.where(visible, 0.0, float("-inf"))
    with torch.no_grad():
        out = model(ids, position_ids=positions, attention_mask=mask, output_attentions=True, use_cache=False)
        expected = reference_first_layer_weights(model, ids, positions, additive)
    torch.testing.assert_close(out.attentions[0], expected, atol=1e-6, rtol=1e-5)
    assert torch.all(out.attentions[0][~visible[:, None].expand_as(out.attentions[0])] == 0)
    # sdpa reads the mask the same way (flex_attention gets the same visibility and bias: test_modeling_coglm)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        logits = model(ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)


def test_bool_and_additive_masks_equal_the_regions(model):
    ids, positions, regions = t2i_batch(batch=2, text_length=5, n=10)
    visible = masked_regions_mask(ids.shape[1], regions[0])[None, None]
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        reference = model(ids, position_ids=positions, mask_regions=regions, use_cache=False).logits
        for mask in (visible, additive, visible.long()):
            logits = model(ids, position_ids=positions, attention_mask=mask, use_cache=False).logits
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
        inverted = model(ids, position_ids=positions, attention_mask=(~visible).float(), use_cache=False).logits
    assert (inverted - reference).abs().max() > 0.1  # a 0/1 float mask is additive, not a visibility


def test_4d_mask_sized_to_the_static_cache(model):
    ids = prompts(batch=2)
    cache = StaticCache(config=model.config, max_cache_len=12)
    causal = torch.ones(5, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, -1, -1)
    with torch.no_grad():
        static = model(ids, attention_mask=causal, past_key_values=cache, use_cache=True).logits
        dynamic = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- (3) cache editing
def test_cache_edits_keep_the_text_key_record(model):
    ids = torch.cat([prompts(batch=2), torch.randint(0, 40, (2, 4))], dim=1)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        cache.crop(-3)  # assisted decoding rolls back rejected tokens
        assert text_key_record_layer(cache).text_keys.shape == (2, 6)
        torch.testing.assert_close(model(ids[:, 6:], past_key_values=cache).logits, full[:, 6:], atol=1e-5, rtol=1e-5)

        order = torch.tensor([1, 0])  # beam search
        cache.reorder_cache(order)
        cache.crop(-3)
        torch.testing.assert_close(model(ids[order, 6:], past_key_values=cache).logits, full[order, 6:],
                                   atol=1e-5, rtol=1e-5)

        cache.crop(-3)
        cache.batch_repeat_interleave(2)  # num_return_sequences / beams from one prompt
        repeated = order.repeat_interleave(2)
        torch.testing.assert_close(model(ids[repeated, 6:], past_key_values=cache).logits, full[repeated, 6:],
                                   atol=1e-5, rtol=1e-5)

        cache.crop(-3)
        keep = torch.tensor([3])
        cache.batch_select_indices(keep)  # contrastive search / finished rows
        torch.testing.assert_close(model(ids[repeated[keep], 6:], past_key_values=cache).logits,
                                   full[repeated[keep], 6:], atol=1e-5, rtol=1e-5)


def test_caches_get_a_coglm_record_layer_and_foreign_contents_are_refused(model):
    ids = prompts()
    for cache, kind in ((DynamicCache(), CogLMDynamicCacheLayer), (DynamicCache(config=model.config), CogLMDynamicCacheLayer),
                        (StaticCache(config=model.config, max_cache_len=8), CogLMStaticCacheLayer)):
        model(ids, past_key_values=cache, use_cache=True)
        assert isinstance(cache.layers[0], kind)
        cache.reset()
        assert text_key_record_layer(cache).get_seq_length() == 0
    foreign = DynamicCache(config=model.config)
    foreign.update(torch.zeros(2, 4, 3, 8), torch.zeros(2, 4, 3, 8), 0)
    with pytest.raises(ValueError, match="not encoded by CogLM"):
        model(ids, past_key_values=foreign)


@pytest.mark.parametrize("seed", range(4))
def test_assisted_decoding_with_another_assistant_equals_greedy(model, seed):
    assistant = tiny_model(seed=100 + seed)  # a different model: most drafts are rejected and the cache is cropped
    ids = prompts(batch=1, seed=seed)
    greedy = model.generate(ids, **{**GREEDY, "max_new_tokens": 10})
    assisted = model.generate(ids, assistant_model=assistant, **{**GREEDY, "max_new_tokens": 10})
    assert torch.equal(assisted, greedy)


def test_beam_search_with_the_cache_equals_without(model):
    ids = prompts(batch=2, seed=3)
    settings = dict(num_beams=3, num_return_sequences=2, **GREEDY)
    assert torch.equal(model.generate(ids, **settings), model.generate(ids, use_cache=False, **settings))


def test_generation_continues_from_its_cache_and_left_padding_is_neutral(model):
    ids = prompts(batch=2, seed=5)
    reference = model.generate(ids, **GREEDY)
    first = model.generate(ids, return_dict_in_generate=True, **{**GREEDY, "max_new_tokens": 3})
    resumed = model.generate(first.sequences, past_key_values=first.past_key_values, **{**GREEDY, "max_new_tokens": 3})
    assert torch.equal(resumed, reference)
    padded = torch.cat([torch.zeros(2, 2, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 2, dtype=torch.long), torch.ones_like(ids)], dim=1)
    for cache in ("dynamic", "static"):
        assert torch.equal(model.generate(padded, attention_mask=mask, cache_implementation=cache, **GREEDY)[:, 2:],
                           reference)
    lookup = model.generate(ids[:1], prompt_lookup_num_tokens=3, **GREEDY)  # drafts from the prompt, cache cropped
    assert torch.equal(lookup, reference[:1])


# ------------------------------------------------------------------------------------------- (1) static cache, compile
def compile_config():
    config = CompileConfig(fullgraph=True, backend="eager", mode="default")
    config._compile_all_devices = True  # compile on CPU too (generate only auto-compiles on accelerators)
    return config


def test_generate_with_static_cache_compiled_or_not_equals_dynamic(model):
    ids = prompts(batch=2, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 0] = 0  # left padding goes through the 4D mask generate builds for the static cache
    dynamic = model.generate(ids, attention_mask=mask, **GREEDY)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)
    torch._dynamo.reset()
    compiled = model.generate(ids, attention_mask=mask, cache_implementation="static",
                              compile_config=compile_config(), **GREEDY)
    assert torch.equal(compiled, dynamic)
    assert hasattr(model, "_compiled_call")  # the decoding steps went through torch.compile (fullgraph)
    assert CogLMForMaskedRegions._can_compile_fullgraph


def test_stage1_layout_through_generate_with_a_static_cache(model):
    """Positions 0…L-1, 512-style <start_of_image>, then the grid: generate extends the given positions by one."""
    ids = prompts(batch=1, seed=2)
    positions = torch.tensor([[0, 1, 2, 3, TINY["boi_position_id"]]])
    dynamic = model.generate(ids, position_ids=positions, **GREEDY)
    static = model.generate(ids, position_ids=positions, cache_implementation="static", **GREEDY)
    assert torch.equal(static, dynamic)
    with torch.no_grad():
        full_positions = torch.cat([positions[0], TINY["boi_position_id"] + torch.arange(1, 6)])
        logits = model(dynamic[:, :-1], position_ids=full_positions, use_cache=False).logits
    assert torch.equal(logits[0, 4:].argmax(-1), dynamic[0, 5:])


# ------------------------------------------------------------------------------------------- (5) packed batches
def test_packed_sequences_are_isolated_like_separate_rows(model):
    g = torch.Generator().manual_seed(4)
    first, second = torch.randint(0, 110, (1, 7), generator=g), torch.randint(0, 110, (1, 5), generator=g)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        separate = torch.cat([model(first).logits, model(second).logits], dim=1)
        by_positions = model(packed, position_ids=positions).logits
        by_boundaries = model(packed, position_ids=positions, cu_seq_lens_q=torch.tensor([0, 7, 12]),
                              cu_seq_lens_k=torch.tensor([0, 7, 12])).logits
    torch.testing.assert_close(by_positions, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_boundaries, separate, atol=1e-5, rtol=1e-5)


def test_packed_length_is_bounded_by_positions_not_tokens(model):
    """Packed rows may hold more tokens than there are positions; each sequence's positions must fit."""
    limit = TINY["max_position_embeddings"]
    ids = torch.randint(0, 110, (1, limit + 8))
    positions = torch.cat([torch.arange(40), torch.arange(limit + 8 - 40)])[None]
    with torch.no_grad():
        assert model(ids, position_ids=positions).logits.shape[1] == limit + 8
    with pytest.raises(ValueError, match="longer than the model allows"):
        model(ids)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        model(ids, position_ids=positions, cu_seq_lens_q=torch.tensor([0, 40]))


# ------------------------------------------------------------------------------------------- (6) shift_labels
def test_shift_labels_drive_the_loss(model):
    ids, positions, regions = t2i_batch(batch=2, text_length=4, n=10)
    shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        by_labels = model(ids, position_ids=positions, mask_regions=regions, labels=ids).loss
        by_shift = model(ids, position_ids=positions, mask_regions=regions, shift_labels=shifted).loss
        torch.testing.assert_close(by_shift, by_labels)
        # a context-parallel shard: its last position predicts the first token of the next shard
        logits = model(ids, position_ids=positions).logits
        targets = torch.randint(0, 110, ids.shape)
        loss = model(ids, position_ids=positions, shift_labels=targets, labels=ids).loss
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    torch.testing.assert_close(loss, expected)
