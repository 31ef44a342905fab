"""Weight-only int8 CogLM models through transformers' TorchAoConfig (torchao), on CPU."""

import pytest
import torch
from safetensors.torch import load_file
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import TorchAoConfig

from coglm_hf import CogLMConfig, CogLMForMaskedRegions
from coglm_hf.attention_masks import text_to_image_regions
from coglm_hf.convert_sat import convert_sat_checkpoint

CASES = ["t2i_L7_n400", "t2i_L23_n57_b2", "t2i_L109_n16"]


def int8_config():
    return TorchAoConfig(Int8WeightOnlyConfig())


@pytest.fixture(scope="module")
def bf16_folder(cogview2_fixture_dir, tmp_path_factory):
    return convert_sat_checkpoint(cogview2_fixture_dir / "checkpoints" / "coglm",
                                  tmp_path_factory.mktemp("int8") / "coglm", dtype="bfloat16")


def image_logits(model, case):
    text_length = int((case["log_attention_weights_cols"] != 0).sum())
    batch, seq = case["input_ids"].shape
    regions = [text_to_image_regions(text_length, seq - text_length - 1)] * batch
    with torch.no_grad():
        return model(case["input_ids"], position_ids=case["position_ids"], mask_regions=regions,
                     image_logits_only=True, use_cache=False).logits.float()


def test_int8_logits_stay_close_to_bf16_and_survive_save_and_reload(bf16_folder, cogview2_fixture_dir, tmp_path):
    bf16 = CogLMForMaskedRegions.from_pretrained(bf16_folder, dtype=torch.bfloat16).eval()
    int8 = CogLMForMaskedRegions.from_pretrained(bf16_folder, dtype=torch.bfloat16,
                                                 quantization_config=int8_config()).eval()
    weight = int8.transformer.layers[0].attention.query_key_value.weight
    assert hasattr(weight, "qdata") and weight.qdata.dtype == torch.int8
    int8.save_pretrained(tmp_path / "int8")
    reloaded = CogLMForMaskedRegions.from_pretrained(tmp_path / "int8").eval()
    assert hasattr(reloaded.transformer.layers[1].mlp.dense_4h_to_h.weight, "qdata")
    for name in CASES:
        case = load_file(cogview2_fixture_dir / "cases" / f"{name}.safetensors")
        reference, quantized = image_logits(bf16, case), image_logits(int8, case)
        # measured on these cases: |int8 − bf16| ≤ 0.62 on logits of std ≈ 2.6 (bf16 vs fp32 differ by up to 0.49);
        # argmax agreement ≥ 96.8 %
        assert (quantized - reference).abs().max() < 0.8, name
        assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() > 0.95, name
        torch.testing.assert_close(image_logits(reloaded, case), quantized, rtol=0, atol=0)


def test_int8_linear_weights_take_about_half_the_bf16_bytes():
    # CogLM's width (3072) is what makes the per-row scales negligible; 1024 keeps the test small
    config = CogLMConfig(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, intermediate_size=4096)
    with torch.device("meta"):
        model = CogLMForMaskedRegions(config)
    layers = model.transformer.layers.to_empty(device="cpu").to(torch.bfloat16)  # the 150010-row embedding stays out
    torch.manual_seed(0)
    for parameter in layers.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    linears = {name: module.weight.detach().clone() for name, module in layers.named_modules()
               if isinstance(module, torch.nn.Linear)}
    quantize_(layers, Int8WeightOnlyConfig())
    modules = dict(layers.named_modules())
    bf16_bytes = int8_bytes = 0
    for name, original in linears.items():
        quantized = modules[name].weight
        int8_bytes += quantized.qdata.numel() * quantized.qdata.element_size()
        int8_bytes += quantized.scale.numel() * quantized.scale.element_size()
        bf16_bytes += original.numel() * original.element_size()
        error = (quantized.dequantize().float() - original.float()).abs().max()
        assert error <= original.float().abs().amax(-1).max() / 127  # within one int8 step of its row's scale
    assert int8_bytes <= 0.55 * bf16_bytes, int8_bytes / bf16_bytes


def test_pipeline_runs_with_an_int8_base_model(tmp_path):
    from test_pipeline_cogview2 import build_tiny_pipeline, seeded, tokens_of, train_sentencepiece

    from coglm_hf import CogView2Pipeline

    build_tiny_pipeline(train_sentencepiece(tmp_path / "tiny.model")).save_pretrained(tmp_path / "pipe")
    base = CogLMForMaskedRegions.from_pretrained(tmp_path / "pipe" / "base_model", dtype=torch.bfloat16,
                                                 quantization_config=int8_config())
    assert hasattr(base.transformer.layers[0].mlp.dense_h_to_4h.weight, "qdata")
    pipe = CogView2Pipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16, base_model=base)
    pipe.set_progress_bar_config(disable=True)
    tokens = tokens_of(pipe, prompt="a red cat", generator=seeded(), num_candidates=2)
    assert tokens.shape[-1] == pipe.high_res_grid and 0 <= int(tokens.min())
    assert int(tokens.max()) < base.config.num_image_tokens
