"""The SAT converter: safe loading, strict key mapping, config checks, dtypes, sharding, atomic output."""

import io
import json
import pickle
import random
import shutil
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from coglm_hf import CogLMForMaskedRegions
from coglm_hf.convert_sat import (
    convert_sat_checkpoint,
    convert_state_dict,
    detect_model_kind,
    load_sat_state_dict,
    map_key,
)


@pytest.fixture()
def sat_copy(cogview2_fixture_dir, tmp_path):
    """A writable copy of the fixture's coglm folder."""
    target = tmp_path / "coglm"
    shutil.copytree(cogview2_fixture_dir / "checkpoints" / "coglm", target)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    target.chmod(0o755)
    return target


def weights_file(folder):
    return folder / folder.joinpath("latest").read_text().strip() / "mp_rank_00_model_states.pt"


def rewrite(folder, mutate):
    path = weights_file(folder)
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    torch.save(payload, path)


def test_detects_each_kind(cogview2_fixture_dir):
    kinds = {}
    for name in ("coglm", "cogview2-dsr", "cogview2-itersr"):
        state_dict, config, iteration = load_sat_state_dict(cogview2_fixture_dir / "checkpoints" / name)
        kinds[name] = detect_model_kind(state_dict)
        assert iteration in ("432000", "20000") and config["num_layers"] == 2
        assert len(convert_state_dict(state_dict)) == len(state_dict)  # every key mapped, none dropped
    assert kinds == {"coglm": "coglm", "cogview2-dsr": "dsr", "cogview2-itersr": "itersr"}


def test_key_mapping_is_explicit():
    assert map_key("transformer.layers.3.attention.query_key_value.weight") == \
        "transformer.layers.3.attention.query_key_value.weight"
    assert map_key("mixins.attention_plus.dense.7.bias") == "transformer.layers.7.attention.hires_dense.bias"
    assert map_key("mixins.extra_position_embedding.position_embeddings.weight") == \
        "transformer.hires_position_embeddings.weight"
    with pytest.raises(KeyError):
        map_key("transformer.layers.0.attention.rotary.inv_freq")


def test_deepspeed_extras_load_safely(sat_copy):
    def add_extras(payload):
        payload.update(iteration=432000, global_steps=432000, ds_config={"fp16": {"enabled": True}},
                       np_rng_state=np.random.RandomState(0).get_state(), random_rng_state=(3, (1, 2), None),
                       cuda_rng_state=torch.zeros(8, dtype=torch.uint8), client_lr_scheduler={"num_iters": 5})

    rewrite(sat_copy, add_extras)
    state_dict, _, _ = load_sat_state_dict(sat_copy)
    assert detect_model_kind(state_dict) == "coglm"


class NotAllowed:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_objects_are_refused(sat_copy, tmp_path, capsys):
    rewrite(sat_copy, lambda payload: payload.update(evil=NotAllowed()))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"refused by the safe loader.*holds a print object") as error:
        convert_sat_checkpoint(sat_copy, out)
    assert "weights_only=False" not in str(error.value) and "this must never run" not in capsys.readouterr().out
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("dtype, torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_dtype_and_sharding(sat_copy, tmp_path, dtype, torch_dtype):
    out = convert_sat_checkpoint(sat_copy, tmp_path / "out", dtype=dtype, max_shard_size="2MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    model = CogLMForMaskedRegions.from_pretrained(out)
    assert model.dtype == torch_dtype
    reference = load_sat_state_dict(sat_copy)[0]["transformer.layers.1.mlp.dense_4h_to_h.weight"]
    torch.testing.assert_close(model.transformer.layers[1].mlp.dense_4h_to_h.weight.float(), reference.float(),
                               atol=1e-2, rtol=1e-2)


def test_refuses_to_overwrite_unless_told(sat_copy, tmp_path):
    out = convert_sat_checkpoint(sat_copy, tmp_path / "out")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_sat_checkpoint(sat_copy, out)
    marker = out / "marker"
    marker.write_text("old")
    convert_sat_checkpoint(sat_copy, out, overwrite=True)
    assert not marker.exists() and (out / "config.json").exists()


def test_config_mismatch_and_missing_keys(sat_copy, tmp_path):
    config_path = sat_copy / "model_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "hidden_size": 16}))
    with pytest.raises(ValueError, match="hidden_size=16"):
        convert_sat_checkpoint(sat_copy, tmp_path / "a")
    config_path.write_text(json.dumps(config))

    rewrite(sat_copy, lambda payload: payload["module"].pop("transformer.layers.1.third_layernorm.bias"))
    with pytest.raises(ValueError, match="missing"):
        convert_sat_checkpoint(sat_copy, tmp_path / "b")
    rewrite(sat_copy, lambda payload: payload["module"].update({"transformer.foo.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_sat_checkpoint(sat_copy, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_missing_files_are_clear(tmp_path, sat_copy):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_sat_state_dict(tmp_path / "nowhere")
    (sat_copy / "latest").write_text("999")
    with pytest.raises(FileNotFoundError, match="named by"):
        load_sat_state_dict(sat_copy)
    (sat_copy / "latest").write_text("banana")
    with pytest.raises(ValueError, match="iteration number or 'release'"):
        load_sat_state_dict(sat_copy)


def test_cli_reports_errors_without_traceback(tmp_path):
    script = REPO_ROOT / "conversion" / "convert_sat_checkpoint.py"
    result = subprocess.run([sys.executable, str(script), "--input", str(tmp_path / "x"), "--output",
                             str(tmp_path / "y")], capture_output=True, text=True)
    assert result.returncode == 1
    assert "error: SAT model folder not found" in result.stderr and "Traceback" not in result.stderr


class _Numpy1Pickler(pickle._Pickler):
    """Names numpy's array helpers as numpy 1.x did (``numpy.core.multiarray.*``), as 2022 DeepSpeed files do.

    With protocol 2 (torch.save's default) the pure-Python pickler already writes ``__builtin__.set`` and
    ``_codecs.encode`` like Python 2-compatible pickles of that time.
    """

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None) or ""
        if module.startswith("numpy._core."):
            legacy = "numpy.core." + module[len("numpy._core."):]
            self.write(pickle.GLOBAL + f"{legacy}\n{name or obj.__qualname__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def deepspeed_model_states(module: dict) -> dict:
    """Every entry DeepSpeed 0.6 + SwissArmyTransformer write into ``mp_rank_00_model_states.pt``."""
    return {
        "module": module, "buffer_names": [], "optimizer": None, "lr_scheduler": None,
        "sparse_tensor_module_names": set(), "skipped_steps": 3, "global_steps": 432000, "global_samples": 1728000,
        "dp_world_size": 4, "mp_world_size": 1, "ds_version": "0.6.0", "iteration": 432000,
        "ds_config": {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True, "loss_scale": 0},
                      "zero_optimization": {"stage": 1}, "gradient_clipping": 0.1},
        "client_lr_scheduler": {"start_lr": np.float64(1e-4), "warmup_iter": 5000, "num_iters": 432000,
                                "decay_style": "cosine", "decay_ratio": 0.1},
        "random_rng_state": random.Random(0).getstate(), "np_rng_state": np.random.RandomState(0).get_state(),
        "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(816, dtype=torch.uint8),
        "rng_tracker_states": {"model-parallel-rng": torch.zeros(816, dtype=torch.uint8)},
    }


def test_numpy1_deepspeed_checkpoint_converts_and_matches_official_logits(sat_copy, cogview2_fixture_dir, tmp_path):
    from test_coglm_parity import check_image_logits, load_case, t2i_inputs

    from coglm_hf.attention_masks import text_to_image_regions

    module = torch.load(weights_file(sat_copy), weights_only=True)["module"]
    numpy1_pickle = types.ModuleType("numpy1_pickle")
    numpy1_pickle.Pickler = _Numpy1Pickler
    torch.save(deepspeed_model_states(module), weights_file(sat_copy), pickle_module=numpy1_pickle, pickle_protocol=2)
    with zipfile.ZipFile(weights_file(sat_copy)) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    for legacy in (b"numpy.core.multiarray\n_reconstruct", b"numpy.core.multiarray\nscalar", b"numpy\ndtype",
                   b"__builtin__\nset", b"_codecs\nencode"):
        assert legacy in pickled
    assert b"numpy._core" not in pickled

    out = convert_sat_checkpoint(sat_copy, tmp_path / "out")
    model = CogLMForMaskedRegions.from_pretrained(out, dtype=torch.float32).eval()
    case = load_case(cogview2_fixture_dir, "t2i_L23_n57_b2")
    text_length, n, batch = t2i_inputs(case)
    with torch.no_grad():
        logits = model(case["input_ids"], position_ids=case["position_ids"],
                       mask_regions=[text_to_image_regions(text_length, n)] * batch, image_logits_only=True,
                       use_cache=False).logits
    check_image_logits(logits, case)


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "not_a_checkpoint", "empty"])
def test_damaged_or_foreign_files_are_named_as_such(sat_copy, tmp_path, damage):
    path = weights_file(sat_copy)
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "overwritten": data[:3000] + bytes(200) + data[3200:],
               "not_a_checkpoint": b"<html>404 Not Found</html>\n", "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match="is damaged .* or is not a PyTorch checkpoint") as error:
        convert_sat_checkpoint(sat_copy, tmp_path / "out")
    message = str(error.value)
    assert "weights_only=False" not in message and "re-save" not in message and "trust" not in message
    assert not (tmp_path / "out").exists()


def test_a_dict_without_module_is_not_a_sat_file(sat_copy):
    buffer = io.BytesIO()
    torch.save({"state_dict": {}}, buffer)
    weights_file(sat_copy).write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="not a SAT model-state file"):
        load_sat_state_dict(sat_copy)
