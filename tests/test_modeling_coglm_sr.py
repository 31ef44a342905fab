"""The super-resolution models on tiny random configs (10×10 → 30×30 direct SR, 18×18 iterative SR).

Each model is compared with a dense float64 re-implementation written here from the rules of the fixture README
(one masked softmax over concatenated keys), so the layouts, masks and the local windows are checked at grid sizes
other than the official 20×20 → 60×60 (which ``test_sr_parity.py`` covers against the official numbers).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_without_coglm_hf
from safetensors.torch import load_file, save_file

from coglm_hf.configuration_coglm import CogLMDirectSRConfig, CogLMIterativeSRConfig
from coglm_hf.modeling_coglm_sr import (
    CogLMForDirectSuperResolution,
    CogLMForIterativeSuperResolution,
    pack_text_slots,
    text_slot_position_ids,
)

BASE = dict(
    vocab_size=208, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
    num_image_tokens=64, text_token_offset=64, boi_token_id=200, start_of_english_token_id=201,
    start_of_chinese_token_id=202, boi_position_id=32, max_text_length=32, max_position_embeddings=136,
    hires_position_offset=136,
)
DSR = dict(BASE, image_grid_size=10, hires_grid_size=30, sr_text_slots=8)
ITERSR = dict(BASE, image_grid_size=6, hires_grid_size=18, sr_text_slots=4)
MASK = 200  # <start_of_image> doubles as the mask token of iterative SR


def perturbed(model):
    """Random LayerNorm affines and biases, so that no term hides behind a 1 or a 0."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
            elif "position_embeddings" in name:
                param.normal_(0, 0.7)
    return model.eval()


@pytest.fixture(scope="module")
def dsr():
    torch.manual_seed(0)
    return perturbed(CogLMForDirectSuperResolution(CogLMDirectSRConfig(**DSR)))


@pytest.fixture(scope="module")
def itersr():
    torch.manual_seed(0)
    return perturbed(CogLMForIterativeSuperResolution(CogLMIterativeSRConfig(**ITERSR)))


def text_batch(lengths, width, seed=0, left=False):
    """Random text ids with padding (value 5, masked) on the right (or left) of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), width), 5, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if left else slice(0, length)
        ids[row, span] = torch.randint(64, 200, (length,), generator=g)
        mask[row, span] = 1
    return ids, mask


def image_batch(batch, grid, seed=1):
    return torch.randint(0, 64, (batch, grid, grid), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ dense reference (float64)
def window_mask(grid, key_grid, window):
    """[grid², key_grid²]: key (i, j) in the window centred at the query's parent cell (clipped at the border)."""
    ratio = grid // key_grid
    cells = torch.arange(grid * grid)
    keys = torch.arange(key_grid * key_grid)
    dy = (keys // key_grid)[None] - (cells // grid // ratio)[:, None]
    dx = (keys % key_grid)[None] - (cells % grid // ratio)[:, None]
    return (dy.abs() <= window[0] // 2) & (dx.abs() <= window[1] // 2)


def official_softmax(scores, visible):
    """Scores · m − 10000 · (1 − m), then softmax (the official masking)."""
    visible = visible.to(scores.dtype)
    return torch.softmax(scores * visible - 10000.0 * (1 - visible), dim=-1)


def split(fused, heads):
    batch, seq, width = fused.shape
    return fused.view(batch, seq, 3, heads, width // 3 // heads).permute(2, 0, 3, 1, 4)


def merge(states):
    return states.transpose(1, 2).reshape(states.shape[0], states.shape[2], -1)


def reference_embeddings(model, ids, positions):
    t, cfg = model.transformer, model.config
    hires = positions >= cfg.hires_position_offset
    table = t.position_embeddings.weight.double()[positions.clamp(max=cfg.max_position_embeddings - 1)]
    extra = t.hires_position_embeddings.weight.double()[(positions - cfg.hires_position_offset).clamp(min=0)]
    return t.word_embeddings.weight.double()[ids] + torch.where(hires[..., None], extra, table)


def reference_layer(layer, h, attend):
    """Sandwich LayerNorm layer in float64 with the attention given as a function of the normalised input."""
    def run(module, x):
        return F.linear(x, module.weight.double(), module.bias.double())

    def norm(module, x):
        return F.layer_norm(x, x.shape[-1:], module.weight.double(), module.bias.double(), module.eps)

    h = h + norm(layer.third_layernorm, attend(norm(layer.input_layernorm, h), run))
    hidden = run(layer.mlp.dense_h_to_4h, norm(layer.post_attention_layernorm, h))
    hidden = F.gelu(hidden, approximate="tanh")
    return h + norm(layer.fourth_layernorm, run(layer.mlp.dense_4h_to_h, hidden))


def reference_logits(model, h):
    t = model.transformer
    h = F.layer_norm(h, h.shape[-1:], t.final_layernorm.weight.double(), t.final_layernorm.bias.double(),
                     t.final_layernorm.eps)
    return h @ model.lm_head.weight.double()[: model.config.num_image_tokens].T


def reference_dsr(model, ids, mask, low_res):
    """Direct SR straight from the README rules: text right-aligned in the slots, pads left."""
    cfg = model.config
    slots, g, big = cfg.sr_text_slots, cfg.image_grid_size, cfg.hires_grid_size
    batch = ids.shape[0]
    layout = torch.zeros(batch, slots, dtype=torch.long)
    text_positions = torch.zeros(batch, slots, dtype=torch.long)
    pad = torch.ones(batch, slots, dtype=torch.bool)
    for row in range(batch):
        text = ids[row][mask[row].bool()]
        n_pad = slots - len(text)
        layout[row, n_pad:], text_positions[row, n_pad:], pad[row, n_pad:] = text, torch.arange(len(text)), False
    ids = torch.cat([layout, low_res.reshape(batch, -1), torch.full((batch, big * big), cfg.boi_token_id)], 1)
    positions = torch.cat([
        text_positions,
        (cfg.boi_position_id + 1 + torch.arange(g * g)).expand(batch, -1),
        (cfg.hires_position_offset + torch.arange(big * big)).expand(batch, -1),
    ], dim=1)
    level0 = slots + g * g
    pad_key = torch.cat([pad, torch.zeros(batch, g * g, dtype=torch.bool)], 1)
    rows = torch.arange(level0)
    visible0 = ((rows[:, None] >= slots) | (rows[None, :] < slots))[None] & (~pad_key[:, None, :] | pad_key[:, :, None])
    visible1 = torch.cat([window_mask(big, g, cfg.cross_window), window_mask(big, big, cfg.local_window)], 1)
    heads, scale = cfg.num_attention_heads, cfg.head_dim**-0.5

    def attend(layer):
        def attention(a, run):
            q0, k0, v0 = split(run(layer.attention.query_key_value, a[:, :level0]), heads)
            q1, k1, v1 = split(run(layer.attention.hires_query_key_value, a[:, level0:]), heads)
            low = official_softmax((q0 * scale) @ k0.transpose(-1, -2), visible0[:, None]) @ v0
            keys, values = torch.cat([k0[:, :, slots:], k1], 2), torch.cat([v0[:, :, slots:], v1], 2)
            high = official_softmax((q1 * scale) @ keys.transpose(-1, -2), visible1) @ values
            return torch.cat([run(layer.attention.dense, merge(low)), run(layer.attention.hires_dense, merge(high))], 1)
        return attention

    h = reference_embeddings(model, ids, positions)
    for layer in model.transformer.layers:
        h = reference_layer(layer, h, attend(layer))
    return reference_logits(model, h[:, level0:])


def reference_itersr(model, ids, mask, image):
    cfg = model.config
    slots, big = cfg.sr_text_slots, cfg.hires_grid_size
    batch = ids.shape[0]
    layout = torch.zeros(batch, slots, dtype=torch.long)
    text_positions = torch.zeros(batch, slots, dtype=torch.long)
    real = torch.zeros(batch, slots, dtype=torch.bool)
    for row in range(batch):
        text = ids[row][mask[row].bool()]
        n_pad = slots - len(text)
        layout[row, n_pad:], text_positions[row, n_pad:], real[row, n_pad:] = text, torch.arange(len(text)), True
    ids = torch.cat([layout, image.reshape(batch, -1)], 1)
    positions = torch.cat([text_positions, (cfg.hires_position_offset + torch.arange(big * big)).expand(batch, -1)], 1)
    n = slots + big * big
    visible = torch.zeros(batch, n, n, dtype=torch.bool)
    visible[:, :, :slots] = real[:, None, :]  # every query sees the real text slots
    visible[:, slots:, slots:] = window_mask(big, big, cfg.local_window)
    heads, scale = cfg.num_attention_heads, cfg.head_dim**-0.5

    def attend(layer):
        def attention(a, run):
            q, k, v = split(run(layer.attention.query_key_value, a), heads)
            out = official_softmax((q * scale) @ k.transpose(-1, -2), visible[:, None]) @ v
            return run(layer.attention.dense, merge(out))
        return attention

    h = reference_embeddings(model, ids, positions)
    for layer in model.transformer.layers:
        h = reference_layer(layer, h, attend(layer))
    return reference_logits(model, h[:, slots:])


# ----------------------------------------------------------------------------------------------------- layouts
def test_text_is_right_aligned_in_the_slots_whatever_the_padding_side():
    ids = torch.tensor([[11, 12, 13, 0, 0], [0, 0, 21, 22, 23], [31, 0, 32, 0, 33], [0, 0, 0, 0, 0]])
    mask = (torch.arange(5)[None] < 3).long().repeat(4, 1)
    mask[1] = torch.tensor([0, 0, 1, 1, 1])
    mask[2] = torch.tensor([1, 0, 1, 0, 1])
    mask[3] = 0
    slots, real = pack_text_slots(ids, mask, 6, pad_token_id=9, stage="test")
    assert slots.tolist() == [[9, 9, 9, 11, 12, 13], [9, 9, 9, 21, 22, 23], [9, 9, 9, 31, 32, 33], [9] * 6]
    assert real.tolist() == [[False] * 3 + [True] * 3] * 3 + [[False] * 6]
    assert text_slot_position_ids(real).tolist() == [[0, 0, 0, 0, 1, 2]] * 3 + [[0] * 6]
    with pytest.raises(ValueError, match="5 text tokens but the model has 4 text slots"):
        pack_text_slots(ids[:1].clone().fill_(70), None, 4, pad_token_id=0, stage="test")


def test_layouts_follow_the_config(dsr, itersr):
    ids, mask = text_batch([3], 5)
    layout = dsr.prepare_layout(ids, mask, image_batch(1, 10))
    assert layout.input_ids.shape == (1, 8 + 100 + 900)
    assert layout.position_ids[0, :8].tolist() == [0] * 6 + [1, 2]
    assert layout.position_ids[0, 8:108].tolist() == list(range(33, 133))
    assert layout.position_ids[0, 108:].tolist() == list(range(136, 1036))
    assert (layout.input_ids[0, 108:] == 200).all()
    layout = itersr.prepare_layout(ids, mask, image_batch(1, 18))
    assert layout.input_ids.shape == (1, 4 + 324)
    assert layout.position_ids[0].tolist() == [0, 0, 1, 2] + list(range(136, 460))
    assert layout.text_mask.tolist() == [[False, True, True, True]]


# ------------------------------------------------------------------------------------- against the reference
def test_direct_sr_10_to_30_matches_dense_reference(dsr):
    ids, mask = text_batch([5, 8, 0], 9, seed=2)  # padded on the right; a full row; an empty prompt
    low_res = image_batch(3, 10)
    with torch.no_grad():
        logits = dsr(input_ids=ids, attention_mask=mask, low_res_tokens=low_res).logits
        flat = dsr(input_ids=ids, attention_mask=mask, low_res_tokens=low_res.view(3, 100)).logits
    assert logits.shape == (3, 900, 64) and logits.dtype == torch.float32
    torch.testing.assert_close(flat, logits, atol=0, rtol=0)
    expected = reference_dsr(dsr, ids, mask, low_res)
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-4)


def test_iterative_sr_matches_dense_reference(itersr):
    ids, mask = text_batch([2, 4, 0], 6, seed=3, left=True)
    image = image_batch(3, 18)
    image[:, ::2, 1::3] = MASK
    with torch.no_grad():
        logits = itersr(input_ids=ids, attention_mask=mask, image_tokens=image).logits
    assert logits.shape == (3, 324, 64)
    torch.testing.assert_close(logits.double(), reference_itersr(itersr, ids, mask, image), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("implementation", ["eager", "flex_attention"])
def test_attention_implementations_agree(dsr, itersr, implementation):
    """The text / level-0 attention goes through Transformers' attention interface: eager, sdpa and flex agree."""
    ids, mask = text_batch([3, 6], 7)
    image = image_batch(2, 18)
    image[:, 1::2] = MASK
    results = {}
    for name in ("sdpa", implementation):
        dsr.set_attn_implementation(name)
        itersr.set_attn_implementation(name)
        with torch.no_grad():
            results[name] = (
                dsr(input_ids=ids, attention_mask=mask, low_res_tokens=image_batch(2, 10)).logits,
                itersr(input_ids=ids[:, :4], attention_mask=mask[:, :4], image_tokens=image).logits,
            )
    dsr.set_attn_implementation("sdpa")
    itersr.set_attn_implementation("sdpa")
    for got, expected in zip(results[implementation], results["sdpa"]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_iterative_sr_is_local(itersr):
    """Changing cell (0, 0) moves only the logits within two 9×5 windows of it (two layers), nothing beyond."""
    ids, mask = text_batch([3], 4)
    image = image_batch(1, 18)
    changed = image.clone()
    changed[0, 0, 0] = MASK
    with torch.no_grad():
        before = itersr(input_ids=ids, attention_mask=mask, image_tokens=image).logits.view(18, 18, -1)
        after = itersr(input_ids=ids, attention_mask=mask, image_tokens=changed).logits.view(18, 18, -1)
    moved = (before - after).abs().amax(-1) > 0
    assert moved[:9, :5].all() and not moved[9:].any() and not moved[:, 5:].any()


# ---------------------------------------------------------------------------------------------------- training
def test_direct_sr_loss_covers_every_hires_cell(dsr):
    ids, mask = text_batch([4, 2], 4)
    labels = torch.randint(0, 64, (2, 30, 30))
    labels[0, 0, :7] = -100
    out = dsr(input_ids=ids, attention_mask=mask, low_res_tokens=image_batch(2, 10), labels=labels)
    expected = F.cross_entropy(out.logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    summed = dsr(input_ids=ids, attention_mask=mask, low_res_tokens=image_batch(2, 10), labels=labels.view(2, -1),
                 num_items_in_batch=torch.tensor(4000))
    torch.testing.assert_close(summed.loss, expected * (1800 - 7) / 4000)


def test_iterative_sr_loss_covers_only_the_masked_cells(itersr):
    ids, mask = text_batch([4, 3], 4)
    image = image_batch(2, 18)
    regenerate = torch.zeros(2, 18, 18, dtype=torch.bool)
    regenerate[:, 2::3, ::2] = True
    masked = torch.where(regenerate, MASK, image)
    labels = torch.randint(0, 64, (2, 18, 18))
    out = itersr(input_ids=ids, attention_mask=mask, image_tokens=masked, labels=labels)
    expected = F.cross_entropy(out.logits[regenerate.view(2, -1)], labels[regenerate])
    torch.testing.assert_close(out.loss, expected)
    other = torch.where(regenerate, labels, torch.randint(0, 64, (2, 18, 18)))  # unmasked labels do not count
    again = itersr(input_ids=ids, attention_mask=mask, image_tokens=masked, labels=other)
    torch.testing.assert_close(again.loss, out.loss)
    # the head on the masked cells only: the same rows and the same loss
    only = itersr(input_ids=ids, attention_mask=mask, image_tokens=masked, labels=labels, masked_logits_only=True,
                  num_items_in_batch=100)
    assert only.logits.shape == (int(regenerate.sum()), 64)
    torch.testing.assert_close(only.logits, out.logits[regenerate.view(2, -1)], atol=0, rtol=0)
    torch.testing.assert_close(only.loss, expected * regenerate.sum() / 100)


@pytest.mark.parametrize("kind", ["dsr", "itersr"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    torch.manual_seed(0)
    if kind == "dsr":
        model = perturbed(CogLMForDirectSuperResolution(CogLMDirectSRConfig(**DSR)))
        inputs = dict(low_res_tokens=image_batch(2, 10), labels=torch.randint(0, 64, (2, 900)))
    else:
        model = perturbed(CogLMForIterativeSuperResolution(CogLMIterativeSRConfig(**ITERSR)))
        image = image_batch(2, 18)
        image[:, ::3] = MASK
        inputs = dict(image_tokens=image, labels=torch.randint(0, 64, (2, 324)))
    ids, mask = text_batch([3, 4], 4)
    model.train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, **inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    trained = "hires_query_key_value" if kind == "dsr" else "attention.query_key_value"
    assert any(trained in name and grad.abs().sum() > 0 for name, grad in grads[0].items())
    assert any("hires_position_embeddings" in name for name in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_finite_and_close(dsr, itersr, dtype, implementation):
    """Also with an empty prompt (no text key to see at all)."""
    ids, mask = text_batch([3, 0], 4)
    image = image_batch(2, 18)
    image[:, ::2] = MASK
    inputs = {dsr: dict(low_res_tokens=image_batch(2, 10)), itersr: dict(image_tokens=image)}
    for model, extra in inputs.items():
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, **extra).logits
            half = model.to(dtype)(input_ids=ids, attention_mask=mask, **extra).logits
        model.float().set_attn_implementation("sdpa")
        assert half.dtype == torch.float32 and torch.isfinite(half).all()
        assert (half - full).abs().max() < 0.25 * full.abs().max()


# -------------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(low_res_tokens=None), ValueError, "needs low_res_tokens"),
        (dict(low_res_tokens=torch.zeros(1, 9, 9, dtype=torch.long)), ValueError, r"\[batch, 10, 10\]"),
        (dict(low_res_tokens=torch.full((1, 10, 10), 150)), ValueError, "image ids in"),
        (dict(low_res_tokens=torch.full((1, 10, 10), MASK)), ValueError, "image ids in"),
        (dict(low_res_tokens=torch.zeros(2, 100, dtype=torch.long)), ValueError, "batch 2"),
        (dict(low_res_tokens=torch.zeros(1, 10, 10)), TypeError, "integer tensor"),
        (dict(input_ids=torch.full((1, 9), 70)), ValueError, "9 text tokens but the model has 8 text slots"),
        (dict(input_ids=torch.full((1, 4), 70.0)), TypeError, "integer tensor"),
        (dict(attention_mask=torch.ones(1, 3)), ValueError, "must match input_ids"),
        (dict(attention_mask=torch.tensor([[1, 2, 1, 0]])), ValueError, "0 \\(padding\\) and 1"),
        (dict(labels=torch.zeros(1, 10, 10, dtype=torch.long)), ValueError, r"labels must be \[batch, 30, 30\]"),
        (dict(labels=torch.full((1, 900), 100)), ValueError, "labels"),
    ],
)
def test_direct_sr_bad_inputs(dsr, change, error, message):
    inputs = dict(input_ids=torch.full((1, 4), 70), attention_mask=None, low_res_tokens=image_batch(1, 10))
    with pytest.raises(error, match=message):
        dsr(**{**inputs, **change})


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(image_tokens=None), "needs image_tokens"),
        (dict(image_tokens=torch.full((1, 18, 18), 70)), "or the mask token 200"),
        (dict(image_tokens=torch.zeros(1, 17, 17, dtype=torch.long)), r"\[batch, 18, 18\]"),
        (dict(input_ids=torch.full((1, 5), 70)), "5 text tokens but the model has 4 text slots"),
    ],
)
def test_iterative_sr_bad_inputs(itersr, change, message):
    inputs = dict(input_ids=torch.full((1, 4), 70), image_tokens=image_batch(1, 18))
    with pytest.raises(ValueError, match=message):
        itersr(**{**inputs, **change})


# ---------------------------------------------------------------------------------------------- save and reload
ROUND_TRIP = """
try:
    import coglm_hf  # noqa: F401
    raise SystemExit("coglm_hf must not be importable here")
except ImportError:
    pass
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
inputs = load_file({inputs!r})
out = {{}}
for name in ("dsr", "itersr"):
    model = AutoModel.from_pretrained({folder!r} + "/" + name, trust_remote_code=True).eval()
    assert model.lm_head.weight.data_ptr() == model.transformer.word_embeddings.weight.data_ptr()
    extra = {{"low_res_tokens": inputs["low_res"]}} if name == "dsr" else {{"image_tokens": inputs["image"]}}
    with torch.no_grad():
        out[name] = model(input_ids=inputs["ids"], attention_mask=inputs["mask"], **extra).logits
    out[name + "_class"] = torch.tensor([ord(c) for c in type(model).__name__])
save_file(out, {result!r})
"""


def test_trust_remote_code_round_trip(dsr, itersr, tmp_path):
    """Saved folders load with AutoModel + trust_remote_code in a process where coglm_hf is not importable."""
    ids, mask = text_batch([3, 4], 4)
    image = image_batch(2, 18)
    image[:, ::2] = MASK
    inputs = dict(ids=ids, mask=mask, low_res=image_batch(2, 10), image=image)
    dsr.save_pretrained(tmp_path / "dsr")
    itersr.save_pretrained(tmp_path / "itersr")
    config = json.loads((tmp_path / "dsr" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_coglm.CogLMDirectSRConfig",
                                  "AutoModel": "modeling_coglm_sr.CogLMForDirectSuperResolution"}
    assert (tmp_path / "itersr" / "local_attention.py").is_file()
    save_file(inputs, tmp_path / "inputs.safetensors")
    script = ROUND_TRIP.format(inputs=str(tmp_path / "inputs.safetensors"), folder=str(tmp_path),
                               result=str(tmp_path / "result.safetensors"))
    run = run_without_coglm_hf(script, [], tmp_path)  # an installed coglm_hf is shadowed by a failing module
    assert run.returncode == 0, run.stderr[-3000:]
    result = load_file(tmp_path / "result.safetensors")
    with torch.no_grad():
        expected_dsr = dsr(input_ids=ids, attention_mask=mask, low_res_tokens=inputs["low_res"]).logits
        expected_itersr = itersr(input_ids=ids, attention_mask=mask, image_tokens=image).logits
    torch.testing.assert_close(result["dsr"], expected_dsr, atol=0, rtol=0)
    torch.testing.assert_close(result["itersr"], expected_itersr, atol=0, rtol=0)
    assert "".join(map(chr, result["dsr_class"].tolist())) == "CogLMForDirectSuperResolution"
    assert "".join(map(chr, result["itersr_class"].tolist())) == "CogLMForIterativeSuperResolution"

    # with the package importable, from_pretrained gives back the same model
    reloaded = CogLMForDirectSuperResolution.from_pretrained(tmp_path / "dsr").eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.word_embeddings.weight.data_ptr()
    with torch.no_grad():
        again = reloaded(input_ids=ids, attention_mask=mask, low_res_tokens=inputs["low_res"]).logits
    torch.testing.assert_close(again, expected_dsr, atol=0, rtol=0)
