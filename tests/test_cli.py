"""The `coglm-hf` command: help texts, generate / edit / convert on tiny models, PNG and grid output, errors."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from test_pipeline_cogview2 import build_tiny_pipeline, single_thread  # noqa: F401
from test_pipeline_cogview2 import spm_model as spm_model  # noqa: F401  (fixture)

from coglm_hf.cli import build_parser, main, make_grid
from coglm_hf.modeling_icevq import IceVQModel
from coglm_hf.pipeline_cogview2 import CogView2Pipeline


@pytest.fixture(scope="module")
def model_dir(spm_model, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    build_tiny_pipeline(spm_model).save_pretrained(folder)
    return folder


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", [[], ["generate"], ["edit"], ["convert"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: coglm-hf" in text
    if command:
        assert "examples:" in text
    if command == ["generate"]:
        assert "--prompt" in text and "--num-candidates" in text and "--grid" in text and "--seed" in text
    if command == ["convert"]:
        assert "--sat-dir" in text and "cluster_label.npy" in text


def test_generate_writes_pngs_and_grid(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--model", model_dir, "--prompt", "a cat", "--prompt", "a blue dog", "-n", 2, "--grid",
            "--output-dir", out, "--seed", 1, "--device", "cpu", "--itersr-top-k", 3, "--sr-batch-size", 3]
    code, stdout, _ = run(argv, capsys)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00-a-cat-0.png", "00-a-cat-1.png", "01-a-blue-dog-0.png", "01-a-blue-dog-1.png", "grid.png"]
    assert stdout.count("wrote") == 5
    images = [np.asarray(PIL.Image.open(out / name)) for name in names[:4]]
    assert all(image.shape == (96, 96, 3) for image in images)
    assert PIL.Image.open(out / "grid.png").size == (3 * 96, 2 * 96)
    # the files are exactly what the pipeline makes with the same seed and settings
    pipe = CogView2Pipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(["a cat", "a blue dog"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1),
                    itersr_top_k=3, sr_batch_size=3).images
    for image, reference in zip(images, expected):
        np.testing.assert_array_equal(image, np.asarray(reference))


def test_generate_first_stage_with_post_selection(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(["generate", "--model", model_dir, "--prompt", "a cat", "--num-candidates", 3,
                      "--only-first-stage", "--style", "photo", "--output-dir", out], capsys)
    assert code == 0 and [p.name for p in out.iterdir()] == ["00-a-cat-0.png"]


def test_edit(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    mask = np.zeros((80, 100), dtype=np.uint8)
    mask[20:60, 30:70] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    code, _, _ = run(["edit", "--model", model_dir, "--image", tmp_path / "photo.png", "--mask", tmp_path / "mask.png",
                      "--prompt", "a red hat", "-n", 2, "--output-dir", out, "--grid"], capsys)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["edit-a-red-hat-0.png", "edit-a-red-hat-1.png", "grid.png"]
    assert PIL.Image.open(out / "edit-a-red-hat-0.png").size == (96, 96)
    code, _, _ = run(["edit", "--model", model_dir, "--image", tmp_path / "photo.png", "--box", "0.2,0.2,0.6,0.7",
                      "--prompt", "a hat", "--output-dir", tmp_path / "box"], capsys)
    assert code == 0 and (tmp_path / "box" / "edit-a-hat-0.png").is_file()


def test_errors(model_dir, tmp_path, capsys):
    PIL.Image.new("RGB", (40, 40)).save(tmp_path / "photo.png")
    cases = [
        (["generate", "--model", tmp_path / "missing", "--prompt", "a cat"], "coglm-hf convert"),
        (["generate", "--model", model_dir, "--prompt", "a cat", "--style", "cubism"], "Unknown style"),
        (["generate", "--model", model_dir, "--prompt", "a cat", "--itersr-top-k", "a,b"], "--itersr-top-k"),
        (["generate", "--model", model_dir, "--prompt", "a cat", "--cpu-offload", "--device", "cpu"], "needs a GPU"),
        (["edit", "--model", model_dir, "--image", tmp_path / "photo.png", "--box", "1,2", "--prompt", "x"],
         "four numbers"),
        (["edit", "--model", model_dir, "--image", tmp_path / "nope.png", "--box", "0,0,1,1", "--prompt", "x"],
         "not found"),
        (["convert", "--output", tmp_path / "c", "--sat-dir", tmp_path, "--cluster-labels", tmp_path / "c.npy"],
         "not found"),
    ]
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        assert code == 1 and message in err, (argv, err)
    code, _, err = run(["generate", "--model", model_dir], capsys)  # no prompt at all
    assert code == 1 and "give at least one prompt" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(model_dir), "--num-images", "two", "a cat"])
    assert exit_info.value.code == 2


def test_convert_complete_pipeline(spm_model, cogview2_fixture_dir, tmp_path, capsys):  # noqa: F811
    """Fixture SAT checkpoints + a sentencepiece model + an icetk-format image checkpoint with 20000 codes →
    one folder with all six components, the tokenizer on the models' id layout."""
    torch.manual_seed(0)
    image_config = dict(channels=8, z_channels=8, embedding_dim=8, num_embeddings=20000, norm_num_groups=4,
                        attn_resolutions=[])
    torch.save({"module": IceVQModel(**image_config).state_dict()}, tmp_path / "ice_image.pt")
    (tmp_path / "image_config.json").write_text(json.dumps(image_config))
    output = tmp_path / "cogview2"
    code, _, err = run(["convert", "--sat-dir", cogview2_fixture_dir / "checkpoints", "--cluster-labels",
                        cogview2_fixture_dir / "cluster_label.npy", "--text-model", spm_model, "--image-model",
                        tmp_path / "ice_image.pt", "--image-config", tmp_path / "image_config.json", "--dtype",
                        "float16", "--output", output], capsys)
    assert code == 0, err
    pipe = CogView2Pipeline.from_pretrained(output)
    assert pipe.tokenizer.boi_token_id == 150000 and pipe.tokenizer.encode_prompt("a cat")[0] >= 20000
    assert pipe.base_model.dtype == torch.float16  # Transformers models load in their saved dtype
    saved = load_file(output / "image_tokenizer" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float16}
    assert CogView2Pipeline.from_pretrained(output, dtype=torch.float16).image_tokenizer.dtype == torch.float16
    pipe.check_components(super_resolution=True, decode=True, tokenize=True)
    images = pipe.decode(torch.randint(0, 20000, (1, 60, 60)), "pt", 1)
    assert images.shape == (1, 3, 480, 480)
    code, _, err = run(["convert", "--sat-dir", cogview2_fixture_dir / "checkpoints", "--cluster-labels",
                        cogview2_fixture_dir / "cluster_label.npy", "--output", output], capsys)
    assert code == 1 and "--overwrite" in err


def test_parser_and_grid_helpers():
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "x"])
    assert args.num_images == 1 and args.style is None and args.dtype == "auto"
    grid = make_grid([PIL.Image.new("RGB", (4, 3), c) for c in ("red", "green", "blue", "white")], columns=3)
    assert grid.size == (12, 6) and grid.getpixel((5, 1)) == (0, 128, 0) and grid.getpixel((10, 4)) == (255,) * 3
