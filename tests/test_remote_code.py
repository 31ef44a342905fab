"""Saved folders load through the Auto classes with trust_remote_code where coglm_hf cannot be imported."""

import json
import sys

import torch
from conftest import run_without_coglm_hf

from coglm_hf import CogLMConfig, CogLMForMaskedRegions

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_image_tokens=40, text_token_offset=40, boi_token_id=110,
            start_of_english_token_id=111, start_of_chinese_token_id=112, boi_position_id=40, image_grid_size=4,
            max_text_length=32)

CHILD = r"""
import json, sys, torch
try:
    import coglm_hf  # noqa: F401
    raise SystemExit("coglm_hf must not be importable here")
except ImportError:
    pass
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM
folder = sys.argv[1]
ids = torch.tensor([[41, 42, 43, 110, 1, 2, 3]])
positions = torch.tensor([0, 1, 2, 40, 41, 42, 43])
regions = [[(3, 6)]]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
head = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = head(ids, position_ids=positions, mask_regions=regions).logits
    hidden = base(ids, position_ids=positions, mask_regions=regions).last_hidden_state
tied = head.lm_head.weight.data_ptr() == head.transformer.word_embeddings.weight.data_ptr()
print(json.dumps({"config": type(config).__name__, "head": type(head).__name__, "base": type(base).__name__,
                  "tied": tied, "logits": logits.flatten().tolist(), "hidden": hidden.flatten().tolist()}))
"""


def test_remote_code_round_trip_in_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = CogLMForMaskedRegions(CogLMConfig(**TINY)).eval()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    files = sorted(p.name for p in folder.iterdir())
    assert {"configuration_coglm.py", "modeling_coglm.py", "attention_masks.py", "model.safetensors"} <= set(files)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}

    # coglm_hf is installed in this environment: the child shadows it with a module that refuses to import
    result = run_without_coglm_hf(CHILD, [str(folder)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["config"] == "CogLMConfig" and child["head"] == "CogLMForMaskedRegions"
    assert child["base"] == "CogLMModel" and child["tied"]

    ids = torch.tensor([[41, 42, 43, 110, 1, 2, 3]])
    positions = torch.tensor([0, 1, 2, 40, 41, 42, 43])
    with torch.no_grad():
        out = model(ids, position_ids=positions, mask_regions=[[(3, 6)]])
    torch.testing.assert_close(torch.tensor(child["logits"]), out.logits.flatten(), atol=1e-5, rtol=1e-5)


def test_remote_code_files_import_only_allowed_packages():
    import ast
    from pathlib import Path

    import coglm_hf

    package = Path(coglm_hf.__file__).parent
    allowed = {"torch", "transformers", "diffusers", "kernels", "__future__"} | set(sys.stdlib_module_names)
    remote_files = ["configuration_coglm.py", "modeling_coglm.py", "attention_masks.py"]
    remote_files += [name for name in ("modeling_coglm_sr.py", "local_attention.py") if (package / name).exists()]
    for name in remote_files:
        tree = ast.parse((package / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in allowed, f"{name} imports {root}, which remote code may not use"
