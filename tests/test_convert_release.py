"""Converting the release as it ships: streamed safetensors, shareable files, zips and the mirror's folder nesting."""

import json
import os
import shutil
import stat
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from coglm_hf import CogView2Pipeline, safetensors_streaming
from coglm_hf.convert_cogview2 import convert_cogview2
from coglm_hf.convert_sat import convert_sat_checkpoint, load_sat_state_dict
from coglm_hf.safetensors_streaming import write_safetensors, write_sharded_weights

NAMES = ("coglm", "cogview2-dsr", "cogview2-itersr")


def test_streamed_files_hold_the_converted_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_streaming, "CHUNK_BYTES", 64)  # many chunks per tensor
    generator = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 11, generator=generator), "b": torch.randn(5, generator=generator).half(),
               "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "ids": torch.arange(10),
               "flags": torch.tensor([True, False, True])}
    for dtype in (None, torch.bfloat16, torch.float16):
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, tensors, dtype)
        loaded = load_file(path)
        assert loaded.keys() == tensors.keys()
        for name, tensor in tensors.items():
            expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            assert loaded[name].dtype == expected.dtype and torch.equal(loaded[name], expected), (dtype, name)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_sharded_weights(sharded, tensors, torch.bfloat16, max_shard_size=200)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = {}
    for file_name in set(index["weight_map"].values()):
        merged.update(load_file(sharded / file_name))
    assert merged.keys() == tensors.keys() and torch.equal(merged["a"], tensors["a"].bfloat16())


def test_converted_files_are_readable_by_others(cogview2_fixture_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        out = convert_sat_checkpoint(cogview2_fixture_dir / "checkpoints" / "coglm", tmp_path / "out",
                                     dtype="bfloat16", max_shard_size="2MB")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o644}, modes


def _zip_folder(folder, archive, prefix):
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as release:
        for path in sorted(folder.rglob("*")):
            release.write(path, f"{prefix}{path.relative_to(folder.parent)}")


def test_release_zips_and_mirror_nesting_convert_without_moving_folders(cogview2_fixture_dir, tmp_path):
    checkpoints = cogview2_fixture_dir / "checkpoints"
    labels = cogview2_fixture_dir / "cluster_label.npy"
    zips = tmp_path / "zips"
    zips.mkdir()
    # the Hugging Face mirror's zips: coglm.zip → sharefs/cogview-new/coglm/…; one of them already extracted
    for name in NAMES[:2]:
        _zip_folder(checkpoints / name, zips / f"{name}.zip", "sharefs/cogview-new/")
    shutil.copytree(checkpoints / NAMES[2], zips / "sharefs" / "cogview-new" / NAMES[2])

    out = convert_cogview2(tmp_path / "pipe", sat_dir=zips, cluster_labels=labels, dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "zips"]  # the scratch extraction is gone
    pipe = CogView2Pipeline.from_pretrained(out)
    official = load_sat_state_dict(checkpoints / "cogview2-dsr")[0]
    torch.testing.assert_close(pipe.dsr_model.transformer.hires_position_embeddings.weight,
                               official["mixins.extra_position_embedding.position_embeddings.weight"].float(),
                               rtol=0, atol=0)


def test_missing_release_files_are_named(cogview2_fixture_dir, tmp_path):
    checkpoints = cogview2_fixture_dir / "checkpoints"
    labels = cogview2_fixture_dir / "cluster_label.npy"
    sat = tmp_path / "sat"
    sat.mkdir()
    shutil.copytree(checkpoints / "coglm", sat / "coglm")
    shutil.copytree(checkpoints / "cogview2-itersr", sat / "cogview2-itersr")
    with pytest.raises(FileNotFoundError, match=r"the cogview2-dsr model was not found .*cogview2-dsr\.zip"):
        convert_cogview2(tmp_path / "out", sat_dir=sat, cluster_labels=labels)

    # a zip without the weights file its 'latest' names
    with zipfile.ZipFile(sat / "cogview2-dsr.zip", "w") as release:
        for path in ("latest", "model_config.json"):
            release.write(checkpoints / "cogview2-dsr" / path, f"cogview2-dsr/{path}")
    with pytest.raises(FileNotFoundError, match=r"has no cogview2-dsr/20000/mp_rank_00_model_states\.pt"):
        convert_cogview2(tmp_path / "out", sat_dir=sat, cluster_labels=labels)
    (sat / "cogview2-dsr.zip").write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(ValueError, match="cogview2-dsr.zip is damaged or not a zip file"):
        convert_cogview2(tmp_path / "out", sat_dir=sat, cluster_labels=labels)

    # an extracted folder without its weights
    (sat / "cogview2-dsr.zip").unlink()
    shutil.copytree(checkpoints / "cogview2-dsr", sat / "cogview2-dsr")
    (sat / "cogview2-dsr" / "20000" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"cogview2-dsr/20000/mp_rank_00_model_states\.pt is missing"):
        convert_cogview2(tmp_path / "out", sat_dir=sat, cluster_labels=labels)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sat"]  # nothing half-written, no scratch left
