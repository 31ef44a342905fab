"""conversion/convert_icetk.py: the official-format icetk fixture -> tokenizer/, image_tokenizer/, scheduler/."""

from __future__ import annotations

import importlib.util
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file

from coglm_hf.conversion_icetk import (
    convert_icetk,
    convert_icetk_image_model,
    icevq_config_from_icetk,
    icevq_config_from_state_dict,
    load_icetk_checkpoint,
)
from coglm_hf.modeling_icevq import IceVQModel
from coglm_hf.scheduling_cogview2 import CogView2Scheduler
from coglm_hf.tokenization_coglm import CogLMTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_cli():
    spec = importlib.util.spec_from_file_location("convert_icetk_cli", REPO_ROOT / "conversion" / "convert_icetk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    rng = random.Random(0)
    words = "a photo of the cat dog red blue house river 一只 猫 在 河边 高清 摄影 隔绝 油画 风格".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 10))) for _ in range(1000)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=50, pad_id=3,
                                   character_coverage=1.0, minloglevel=2)
    path = tmp_path_factory.mktemp("text") / "ice_text.model"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def icetk_files(icetk_fixture_dir):
    return {"image_model": icetk_fixture_dir / "ice_image.pt", "image_config": icetk_fixture_dir / "config.json"}


@pytest.fixture(scope="module")
def state_dict(icetk_files):
    return load_icetk_checkpoint(icetk_files["image_model"])


@pytest.fixture(scope="module")
def converted(text_model, icetk_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "icetk"
    convert_icetk(text_model, output_dir=output, num_clusters=16, **icetk_files)
    return output


def test_output_layout_and_round_trip(converted, text_model, icetk_fixture_dir):
    assert sorted(p.name for p in converted.iterdir()) == ["image_tokenizer", "scheduler", "tokenizer"]
    assert (converted / "image_tokenizer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(converted.parent.glob(".icetk.*"))  # no staging leftovers

    tokenizer = CogLMTokenizer.from_pretrained(converted / "tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(text_model))
    # default offset = codebook size (512 here, 20000 for icetk); specials right after the text range
    assert tokenizer.text_token_offset == 512 and tokenizer.boi_token_id == 512 + sp.get_piece_size()
    assert tokenizer.encode("a photo of 一只 猫") == [i + 512 for i in sp.encode("a photo of 一只 猫")]

    vq = IceVQModel.from_pretrained(converted / "image_tokenizer")
    cases = load_file(icetk_fixture_dir / "cases.safetensors")
    with torch.no_grad():
        assert torch.equal(vq.encode(cases["enc_sq160.image"]), cases["enc_sq160.r8.ids"])
        torch.testing.assert_close(vq.decode(cases["dec_r16_4x6.ids"], 16), cases["dec_r16_4x6.image"], atol=1e-4,
                                   rtol=0)

    # every tensor of the official file went into the model, except the two EMA buffers (dropped on purpose)
    saved = load_file(converted / "image_tokenizer" / "diffusion_pytorch_model.safetensors")
    official = torch.load(icetk_fixture_dir / "ice_image.pt", map_location="cpu", weights_only=True)["module"]
    assert set(official) - set(saved) == {"quantize.cluster_size", "quantize.embed_avg"}
    assert all(torch.equal(saved[k], official[k]) for k in saved)

    scheduler = CogView2Scheduler.from_pretrained(converted / "scheduler")
    assert scheduler.cluster_labels.shape == (512,)
    assert torch.equal(scheduler.cluster_labels, vq.compute_cluster_labels(16, seed=0))


def test_cluster_labels_file(text_model, icetk_files, tmp_path, cogview2_fixture_dir):
    labels = np.random.default_rng(0).integers(0, 7, size=512)
    np.save(tmp_path / "cluster_label.npy", labels)
    output = convert_icetk(text_model, output_dir=tmp_path / "out", cluster_labels=tmp_path / "cluster_label.npy",
                           **icetk_files)
    scheduler = CogView2Scheduler.from_pretrained(output / "scheduler")
    assert scheduler.cluster_labels.tolist() == labels.tolist()
    # CogView2's real table has 20000 entries: it does not fit the fixture's 512-code codebook
    with pytest.raises(ValueError, match=r"one entry per code \(512\)"):
        convert_icetk(text_model, output_dir=tmp_path / "bad", cluster_labels=cogview2_fixture_dir /
                      "cluster_label.npy", **icetk_files)
    assert not (tmp_path / "bad").exists()


def test_config_mapping(icetk_files, state_dict):
    with open(icetk_files["image_config"], encoding="utf-8") as handle:
        config = icevq_config_from_icetk(json.load(handle))
    assert config["channels"] == 32 and config["num_embeddings"] == 512 and config["decoder_num_res_blocks"] == 1
    assert config["decoder_channel_mults"] == [[1, 1, 1, 2, 4], [1, 1, 2, 4], [1, 2, 4]]
    # without a config the widths come from the shapes and give the same model
    inferred = json.loads(json.dumps(dict(IceVQModel(**icevq_config_from_state_dict(state_dict)).config)))
    assert {k: inferred[k] for k in config} == config


def test_dtype(state_dict):
    model = convert_icetk_image_model(state_dict, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.quantize.embed.weight, state_dict["quantize.embed.weight"].to(torch.bfloat16))


def test_strict_key_checks(state_dict):
    renamed = dict(state_dict)
    renamed["enc.mid.attn_1.query.weight"] = renamed.pop("enc.mid.attn_1.q.weight")
    with pytest.raises(ValueError, match=r"1 missing: \['enc.mid.attn_1.q.weight'\]; 1 unexpected"):
        convert_icetk_image_model(renamed)
    missing = {k: v for k, v in state_dict.items() if not k.startswith("decs.2.")}
    with pytest.raises(ValueError, match="missing: .*decs.2.conv_in.weight"):
        convert_icetk_image_model(missing)
    extra = dict(state_dict, **{"decs.3.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected: \['decs.3.conv_in.weight'\]"):
        convert_icetk_image_model(extra)
    reshaped = dict(state_dict, **{"decs.1.conv_out.weight": torch.zeros(3, 64, 3, 3)})
    with pytest.raises(ValueError, match=r"wrong shape: \['decs.1.conv_out.weight: checkpoint \[3, 64, 3, 3\]"):
        convert_icetk_image_model(reshaped)
    bad_buffer = dict(state_dict, **{"quantize.cluster_size": torch.zeros(20000)})
    with pytest.raises(ValueError, match="quantize.cluster_size"):
        convert_icetk_image_model(bad_buffer)
    with pytest.raises(ValueError, match="not an icetk image tokenizer checkpoint"):
        convert_icetk_image_model({"weight": torch.zeros(1)})
    # the official full-size architecture does not take the narrow fixture weights
    with pytest.raises(ValueError, match="wrong shape"):
        convert_icetk_image_model(state_dict, config={})


class _NotATensor:
    pass


def test_unsafe_or_broken_checkpoints(tmp_path):
    torch.save({"module": {"x": _NotATensor()}}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="not a loadable torch checkpoint"):
        load_icetk_checkpoint(tmp_path / "pickled.pt")  # weights_only=True refuses arbitrary objects
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a loadable torch checkpoint"):
        load_icetk_checkpoint(tmp_path / "text.pt")
    torch.save({"module": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_icetk_checkpoint(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="ice_image.pt"):
        load_icetk_checkpoint(tmp_path / "missing.pt")


def test_failures_write_nothing(text_model, icetk_files, tmp_path):
    (tmp_path / "not_spm.model").write_text("hello")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        convert_icetk(tmp_path / "not_spm.model", output_dir=tmp_path / "out", **icetk_files)
    with pytest.raises(ValueError, match="dtype"):
        convert_icetk(text_model, output_dir=tmp_path / "out", dtype="float8", **icetk_files)
    with pytest.raises(ValueError, match="text_token_offset"):
        convert_icetk(text_model, output_dir=tmp_path / "out", text_token_offset=100, **icetk_files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_spm.model"]


def test_cli(text_model, icetk_files, tmp_path, capsys):
    cli = _load_cli()
    args = ["--text-model", str(text_model), "--image-model", str(icetk_files["image_model"]), "--image-config",
            str(icetk_files["image_config"]), "--num-clusters", "8", "--output", str(tmp_path / "out")]
    assert cli.main(args) == 0
    first = (tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text()
    # an existing output is kept unless --overwrite
    assert cli.main(args[:-4] + ["--num-clusters", "4", "--output", str(tmp_path / "out")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text() == first
    assert cli.main(args[:-4] + ["--num-clusters", "4", "--output", str(tmp_path / "out"), "--overwrite"]) == 0
    assert CogView2Scheduler.from_pretrained(tmp_path / "out" / "scheduler").config.num_clusters == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert cli.main(args[:2] + ["--image-model", str(tmp_path / "nope.pt"), "--output", str(tmp_path / "x")]) == 1
    assert "not found" in capsys.readouterr().err
