"""The full pipeline against the official code: the fixture's SAT checkpoints converted into a pipeline folder
(conversion/convert_cogview2.py) reproduce the deterministic end-to-end run `e2e_L20` of
``../shared/fixtures/cogview2_reference`` token for token — stage 1, direct SR and each LoPAR pass. Also: weight
deduplication and the converter's errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from coglm_hf.convert_cogview2 import SHARED_SHARD_PREFIX, convert_cogview2
from coglm_hf.convert_sat import load_sat_state_dict
from coglm_hf.pipeline_cogview2 import CogView2Pipeline


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def converted(cogview2_fixture_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("converted") / "cogview2"
    convert_cogview2(folder, sat_dir=cogview2_fixture_dir / "checkpoints",
                     cluster_labels=cogview2_fixture_dir / "cluster_label.npy", max_shard_size="2MB")
    return folder


def test_end_to_end_matches_official(converted, cogview2_fixture_dir):
    case = load_file(cogview2_fixture_dir / "cases" / "e2e_L20.safetensors")
    pipe = CogView2Pipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer is None and pipe.image_tokenizer is None
    labels = np.load(cogview2_fixture_dir / "cluster_label.npy", allow_pickle=False)
    assert torch.equal(pipe.scheduler.cluster_labels, torch.from_numpy(labels))

    seen = {}

    def callback(p, step, stage, kwargs):
        if stage == "stage1" and step == 399 or stage in ("dsr", "itersr"):
            seen[(stage, step)] = kwargs["image_tokens"].reshape(1, -1).clone()
        return {}

    out = pipe(prompt_ids=case["text_ids"], output_type="tokens", callback_on_step_end=callback,
               temperature=1.15, top_k_clusters=1, cluster_temperature=0, dsr_temperature=1.0, dsr_top_k_clusters=1,
               dsr_cluster_temperature=0, itersr_top_k=1)
    assert torch.equal(seen[("stage1", 399)], case["stage1_tokens"])
    assert torch.equal(seen[("dsr", 0)], case["dsr_tokens"])
    for index in range(6):
        assert torch.equal(seen[("itersr", index)], case["itersr_tokens"][index]), f"LoPAR pass {index + 1}"
    assert out.images.shape == (1, 60, 60) and torch.equal(out.images.view(1, -1), case["final_tokens"])


def write_sat(folder, state_dict, model_config, iteration="20000"):
    folder.mkdir(parents=True)
    (folder / "latest").write_text(iteration)
    (folder / "model_config.json").write_text(json.dumps(model_config))
    (folder / iteration).mkdir()
    torch.save({"module": state_dict}, folder / iteration / "mp_rank_00_model_states.pt")


def test_identical_weights_are_stored_once(cogview2_fixture_dir, tmp_path):
    """DSR with coglm's backbone (as a frozen-backbone DSR would have) and iter-SR with coglm's word embedding."""
    source = cogview2_fixture_dir / "checkpoints"
    coglm, coglm_config, _ = load_sat_state_dict(source / "coglm")
    dsr, dsr_config, _ = load_sat_state_dict(source / "cogview2-dsr")
    itersr, itersr_config, _ = load_sat_state_dict(source / "cogview2-itersr")
    dsr.update({key: value.clone() for key, value in coglm.items()})
    itersr["transformer.word_embeddings.weight"] = coglm["transformer.word_embeddings.weight"].clone()
    sat = tmp_path / "sat"
    write_sat(sat / "coglm", coglm, coglm_config, "432000")
    write_sat(sat / "cogview2-dsr", dsr, dsr_config)
    write_sat(sat / "cogview2-itersr", itersr, itersr_config)
    labels = cogview2_fixture_dir / "cluster_label.npy"

    plain, deduplicated = tmp_path / "plain", tmp_path / "dedup"
    convert_cogview2(plain, sat_dir=sat, cluster_labels=labels, deduplicate=False)
    convert_cogview2(deduplicated, sat_dir=sat, cluster_labels=labels, max_shard_size="3MB")

    def files(folder):
        return {p.relative_to(folder): p for p in folder.rglob("*.safetensors")}

    dedup_files = files(deduplicated)
    shared = [p for p in dedup_files if p.name.startswith(SHARED_SHARD_PREFIX)]
    assert shared
    for name in {p.name for p in shared}:
        copies = [dedup_files[p] for p in shared if p.name == name]
        assert len(copies) >= 2 and len({os.stat(c).st_ino for c in copies}) == 1  # one file, hard-linked
    unique_bytes = sum(os.stat(p).st_size for p in {os.stat(p).st_ino: p for p in dedup_files.values()}.values())
    plain_bytes = sum(os.stat(p).st_size for p in files(plain).values())
    embedding_bytes = coglm["transformer.word_embeddings.weight"].numel() * 4
    assert unique_bytes < plain_bytes - 2 * embedding_bytes  # the embedding (and more) is stored once, not thrice

    a, b = CogView2Pipeline.from_pretrained(plain), CogView2Pipeline.from_pretrained(deduplicated)
    for name in ("base_model", "dsr_model", "itersr_model"):
        expected, actual = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}.{key}"
    assert torch.equal(b.dsr_model.transformer.layers[1].mlp.dense_h_to_4h.weight,
                       b.base_model.transformer.layers[1].mlp.dense_h_to_4h.weight)


def test_conversion_errors(cogview2_fixture_dir, icetk_fixture_dir, tmp_path):
    checkpoints = cogview2_fixture_dir / "checkpoints"
    labels = cogview2_fixture_dir / "cluster_label.npy"
    output = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_cogview2(output, sat_dir=tmp_path / "nowhere", cluster_labels=labels)
    with pytest.raises(ValueError, match="holds a cogview2-dsr checkpoint but the coglm one"):
        convert_cogview2(output, sat_dir=checkpoints, coglm_dir=checkpoints / "cogview2-dsr", cluster_labels=labels)
    with pytest.raises(ValueError, match="cluster_labels is required"):
        convert_cogview2(output, sat_dir=checkpoints)
    with pytest.raises(ValueError, match="give sat_dir"):
        convert_cogview2(output, cluster_labels=labels)
    short = tmp_path / "short.npy"
    np.save(short, np.arange(100) % 7)
    with pytest.raises(ValueError, match="one entry per code"):
        convert_cogview2(output, sat_dir=checkpoints, cluster_labels=short)
    # the icetk fixture's image tokenizer has 512 codes; the CogLM fixture models use 20000 image ids
    with pytest.raises(ValueError, match="512 codes but the CogLM models use 20000"):
        convert_cogview2(output, sat_dir=checkpoints, cluster_labels=labels,
                         image_model=icetk_fixture_dir / "ice_image.pt", image_config=icetk_fixture_dir / "config.json")
    with pytest.raises(ValueError, match="dtype"):
        convert_cogview2(output, sat_dir=checkpoints, cluster_labels=labels, dtype="int8")
    assert not output.exists() and [p.name for p in tmp_path.iterdir()] == ["short.npy"]  # nothing half-written

    convert_cogview2(output, sat_dir=checkpoints, cluster_labels=labels, dtype="bfloat16")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_cogview2(output, sat_dir=checkpoints, cluster_labels=labels)
    pipe = CogView2Pipeline.from_pretrained(output)
    assert pipe.dsr_model.dtype == torch.bfloat16 and oct(output.stat().st_mode)[-3:] == "755"
    shutil.rmtree(output)
