"""IceVQModel against the numbers of the official icetk code (fixtures/icetk_vqvae), plus processing and k-means."""

from __future__ import annotations

import copy
import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from coglm_hf.conversion_icetk import convert_icetk_image_model, icevq_config_from_icetk, load_icetk_checkpoint
from coglm_hf.image_processing_icevq import IceVQImageProcessor
from coglm_hf.modeling_icevq import IceVQModel

ENCODE_CASES = [("enc_sq64", 4), ("enc_sq64", 8), ("enc_sq64", 16), ("enc_sq160", 8), ("enc_sq160", 16),
                ("enc_rect48x80", 4), ("enc_rect48x80", 8), ("enc_rect48x80", 16)]
DECODE_CASES = [("dec_r8_20x20", 8), ("dec_r8_6x10_b3", 8), ("dec_r4_16x16", 4), ("dec_r16_4x6", 16)]


@pytest.fixture(scope="module")
def fixture_meta(icetk_fixture_dir):
    with open(icetk_fixture_dir / "cases.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def atol(fixture_meta):
    return fixture_meta["tolerances"]["suggested_atol_fp32"]


@pytest.fixture(scope="module")
def cases(icetk_fixture_dir):
    return load_file(icetk_fixture_dir / "cases.safetensors")


@pytest.fixture(scope="module")
def vq(icetk_fixture_dir):
    with open(icetk_fixture_dir / "config.json", encoding="utf-8") as handle:
        config = icevq_config_from_icetk(json.load(handle))
    return convert_icetk_image_model(load_icetk_checkpoint(icetk_fixture_dir / "ice_image.pt"), config)


def test_architecture_matches_official_key_list(icetk_fixture_dir):
    official = IceVQModel()
    assert sum(p.numel() for p in official.parameters()) == 97_439_497
    # same names and order as icetk's state dict, minus the two EMA training buffers
    state = torch.load(icetk_fixture_dir / "ice_image.pt", map_location="cpu", weights_only=True)["module"]
    kept = [k for k in state if k not in ("quantize.cluster_size", "quantize.embed_avg")]
    assert kept == list(official.state_dict()) and len(state) == 329
    assert official.compress_rates == (4, 8, 16)


@torch.no_grad()
@pytest.mark.parametrize(("case", "rate"), ENCODE_CASES)
def test_encode_matches_icetk(vq, cases, atol, case, rate):
    image = cases[f"{case}.image"]
    torch.testing.assert_close(vq.normalize(image), cases[f"{case}.image_normalized"], atol=atol["image_normalized"],
                               rtol=0)
    latent = vq.encode_latents(image, compress_rate=rate)
    if f"{case}.r{rate}.latent" in cases:
        torch.testing.assert_close(latent, cases[f"{case}.r{rate}.latent"], atol=atol["latent"], rtol=0)
    torch.testing.assert_close(vq.quantize.proj(latent), cases[f"{case}.r{rate}.z_e"], atol=atol["z_e"], rtol=0)
    ids = vq.encode(image, compress_rate=rate)
    assert ids.dtype == torch.long and ids.shape == cases[f"{case}.r{rate}.ids"].shape
    assert torch.equal(ids, cases[f"{case}.r{rate}.ids"])
    if f"{case}.r{rate}.recon" in cases:
        torch.testing.assert_close(vq.decode(ids, compress_rate=rate), cases[f"{case}.r{rate}.recon"],
                                   atol=atol["recon"], rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(("case", "rate"), DECODE_CASES)
def test_decode_matches_icetk(vq, cases, atol, case, rate):
    ids = cases[f"{case}.ids"]
    if f"{case}.quant" in cases:
        assert torch.equal(vq.quantize.lookup(ids), cases[f"{case}.quant"])
    torch.testing.assert_close(vq.decode_raw(ids, compress_rate=rate), cases[f"{case}.decoded_raw"],
                               atol=atol["decoded_raw"], rtol=0)
    image = vq.decode(ids, compress_rate=rate)
    assert image.shape == (ids.shape[0], 3, ids.shape[1] * rate, ids.shape[2] * rate)
    torch.testing.assert_close(image, cases[f"{case}.image"], atol=atol["image"], rtol=0)


@torch.no_grad()
def test_batched_equals_per_image(vq, cases, atol):
    images = cases["enc_rect48x80.image"]
    batched = vq.encode(images)  # default rate 8
    assert batched.shape == (2, 6, 10)
    for i in range(images.shape[0]):
        assert torch.equal(vq.encode(images[i : i + 1]), batched[i : i + 1])
    assert torch.equal(vq.encode(images[0]), batched[:1])  # a single [3, H, W] image
    ids = cases["dec_r8_6x10_b3.ids"]
    decoded = vq.decode(ids)
    for i in range(ids.shape[0]):
        torch.testing.assert_close(vq.decode(ids[i : i + 1]), decoded[i : i + 1], atol=atol["image"], rtol=0)


@torch.no_grad()
def test_half_precision(vq, cases):
    ids = cases["dec_r8_6x10_b3.ids"]
    reference = vq.decode(ids)
    for dtype in (torch.bfloat16, torch.float16):
        half = copy.deepcopy(vq).to(dtype)
        image = half.decode(ids)
        assert image.dtype == torch.float32 and torch.isfinite(image).all()
        assert (image - reference).abs().max() < 0.1
    bf16 = copy.deepcopy(vq).to(torch.bfloat16)
    # icetk's normalisation constants stay fp32 after a dtype cast
    torch.testing.assert_close(bf16.normalize(cases["enc_sq64.image"]), cases["enc_sq64.image_normalized"],
                               atol=1e-6, rtol=0)
    assert torch.equal(bf16.encode(cases["enc_sq64.image"]), cases["enc_sq64.r8.ids"])  # margins are wide


@torch.no_grad()
def test_save_and_load(vq, cases, tmp_path):
    vq.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = IceVQModel.from_pretrained(tmp_path)
    assert loaded.config.num_embeddings == 512 and loaded.config.decoder_channel_mults == [[1, 1, 1, 2, 4],
                                                                                            [1, 1, 2, 4], [1, 2, 4]]
    assert torch.equal(loaded.encode(cases["enc_sq64.image"], 16), cases["enc_sq64.r16.ids"])
    assert torch.equal(loaded.decode(cases["dec_r16_4x6.ids"], 16), vq.decode(cases["dec_r16_4x6.ids"], 16))


def test_bad_input(vq, cases):
    image = cases["enc_sq64.image"]
    with pytest.raises(ValueError, match="not a non-empty multiple of the compression rate 8"):
        vq.encode(torch.rand(1, 3, 65, 65))
    with pytest.raises(ValueError, match="not a non-empty multiple of the compression rate 16"):
        vq.encode(torch.rand(1, 3, 64, 72), compress_rate=16)
    with pytest.raises(ValueError, match="compress_rate must be one of"):
        vq.encode(image, compress_rate=32)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vq.encode(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        vq.encode(image * 2 - 1)
    with pytest.raises(TypeError, match="floating point"):
        vq.encode((image * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vq.encode(PIL.Image.new("RGB", (64, 64)))
    ids = cases["dec_r8_6x10_b3.ids"].clone()
    for bad in (-1, 512):
        ids[0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"ids must be in \[0, 512\)"):
            vq.decode(ids)
    with pytest.raises(ValueError, match=r"\[B, h, w\]"):
        vq.decode(cases["dec_r8_6x10_b3.ids"].flatten(1))
    with pytest.raises(TypeError, match="integer"):
        vq.decode(cases["dec_r8_6x10_b3.ids"].float())


def test_config_is_validated():
    with pytest.raises(ValueError, match="multiple of norm_num_groups"):
        IceVQModel(channels=48)
    with pytest.raises(ValueError, match="serves rate"):
        IceVQModel(decoder_channel_mults=((1, 1, 1, 2, 4), (1, 2, 4), (1, 2, 4)))
    with pytest.raises(ValueError, match="compress_rate"):
        IceVQModel(compress_rate=2)
    with pytest.raises(ValueError, match="encoder_type"):
        IceVQModel(encoder_type="resnet")


def _small_vq(encoder_type: str = "patch") -> IceVQModel:
    torch.manual_seed(0)
    return IceVQModel(channels=16, z_channels=16, embedding_dim=8, num_embeddings=64,
                      encoder_channel_mult=(1, 2, 4, 4), encoder_num_res_blocks=2,
                      decoder_channel_mults=((1, 2, 4, 4),), norm_num_groups=8, resolution=32, attn_resolutions=(),
                      encoder_type=encoder_type).eval()


def test_patch_encoder_is_local():
    """Every code of the patch encoder depends on its own 8x8 pixels only; icetk's encoder sees its neighbours."""
    torch.manual_seed(1)
    images = torch.rand(1, 3, 32, 32)
    changed = images.clone()
    changed[:, :, 8:16, 8:16] = torch.rand(3, 8, 8)  # token (1, 1)
    with torch.no_grad():
        for model, local in ((_small_vq("patch"), True), (_small_vq("icetk"), False)):
            difference = (model.encode_latents(images) - model.encode_latents(changed)).abs().amax(1)[0]
            assert difference[1, 1] > 0
            others = torch.ones_like(difference, dtype=torch.bool)
            others[1, 1] = False
            assert (difference[others].max() == 0) == local
    # the same patch anywhere in an image gets the same code
    model = _small_vq()
    patch = torch.rand(3, 8, 8)
    tiled = patch.repeat(1, 4, 4)[None]
    assert torch.unique(model.encode(tiled)).numel() == 1


def test_patch_encoder_saves_and_loads(tmp_path):
    model = _small_vq()
    model.save_pretrained(tmp_path)
    loaded = IceVQModel.from_pretrained(tmp_path).eval()
    assert loaded.config.encoder_type == "patch"
    images = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))
        torch.testing.assert_close(loaded.decode(model.encode(images)), model.decode(model.encode(images)))


def test_kmeans_cluster_labels(vq):
    labels = vq.compute_cluster_labels(12, seed=0)
    assert labels.dtype == torch.long and labels.shape == (512,)
    assert torch.equal(labels, vq.compute_cluster_labels(12, seed=0))  # deterministic for a seed
    assert torch.equal(torch.unique(labels), torch.arange(12))  # every code assigned, exactly 12 clusters
    assert (torch.bincount(labels, minlength=12) > 0).all()
    # codes of a cluster are nearer to their own centroid than to the others (a real clustering)
    codebook = vq.quantize.embed.weight.detach().double()
    centres = torch.stack([codebook[labels == c].mean(0) for c in range(12)])
    assert (torch.cdist(codebook, centres).argmin(1) == labels).float().mean() > 0.95
    with pytest.raises(ValueError, match="num_clusters"):
        vq.compute_cluster_labels(513)


def test_kmeans_with_duplicate_codes():
    model = IceVQModel(channels=32, z_channels=32, embedding_dim=4, num_embeddings=40)
    with torch.no_grad():
        model.quantize.embed.weight.copy_(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)).repeat(8, 1))
    labels = model.compute_cluster_labels(5, seed=3)
    assert torch.equal(torch.bincount(labels), torch.full((5,), 8))
    with pytest.raises(ValueError, match="only 5 distinct"):
        model.compute_cluster_labels(6)


def test_preprocess_inputs_agree(cases):
    processor = IceVQImageProcessor()
    image = cases["enc_rect48x80.image"][0]
    as_uint8 = (image * 255).round().to(torch.uint8)
    pil = PIL.Image.fromarray(as_uint8.permute(1, 2, 0).numpy())
    from_pil = processor.preprocess(pil)
    assert from_pil.shape == (1, 3, 48, 80) and from_pil.dtype == torch.float32
    assert torch.equal(processor.preprocess(as_uint8.permute(1, 2, 0).numpy()), from_pil)
    assert torch.equal(processor.preprocess(as_uint8), from_pil)
    assert torch.equal(processor.preprocess([pil, pil]), torch.cat([from_pil, from_pil]))
    assert torch.equal(processor.preprocess(cases["enc_rect48x80.image"]), cases["enc_rect48x80.image"])
    with pytest.raises(ValueError, match="different sizes"):
        processor.preprocess([pil, pil.resize((64, 64))])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        processor.preprocess(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(TypeError, match="PIL images, numpy arrays or torch tensors"):
        processor.preprocess("image.png")


def test_preprocess_resizes_shorter_side_and_centre_crops():
    # 40 x 100 (h x w) image whose columns encode their x position; after resize 16 -> 16 x 40, crop the middle 16
    ramp = np.tile(np.linspace(0, 255, 100, dtype=np.float32), (40, 1)).round().astype(np.uint8)
    array = np.stack([ramp, ramp, ramp], -1)
    processor = IceVQImageProcessor(image_size=16)
    for image in (PIL.Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1)):
        out = processor.preprocess(image)
        assert out.shape == (1, 3, 16, 16)
        centre = out[0, 0, 8].mean().item()
        assert abs(centre - 0.5) < 0.05  # the middle of the ramp, not its left end
    tall = processor.preprocess(PIL.Image.new("RGB", (20, 70), (255, 0, 0)))
    assert tall.shape == (1, 3, 16, 16) and torch.allclose(tall[0, 0], torch.ones(16, 16))


def test_postprocess_round_trip(cases):
    processor = IceVQImageProcessor()
    images = cases["dec_r8_6x10_b3.image"]  # decoded images, partly outside [0, 1]
    pils = processor.postprocess(images, output_type="pil")
    assert len(pils) == 3 and pils[0].size == (80, 48) and pils[0].mode == "RGB"
    array = processor.postprocess(images, output_type="np")
    assert array.shape == (3, 48, 80, 3) and array.min() >= 0 and array.max() <= 1
    tensor = processor.postprocess(images, output_type="pt")
    torch.testing.assert_close(tensor, images.clamp(0, 1))
    torch.testing.assert_close(processor.preprocess(pils), tensor, atol=0.5 / 255 + 1e-6, rtol=0)
    with pytest.raises(ValueError, match="output_type"):
        processor.postprocess(images, output_type="latent")


@torch.no_grad()
def test_processor_feeds_the_model(vq, cases):
    processor = IceVQImageProcessor()
    image = cases["enc_sq64.image"]
    ids = vq.encode(processor.preprocess(list(image)))
    assert torch.equal(ids, cases["enc_sq64.r8.ids"])
    assert processor.postprocess(vq.decode(ids), "np").shape == (2, 64, 64, 3)
