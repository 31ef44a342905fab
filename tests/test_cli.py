"""The `coglm-hf` command: help texts, generate / edit / convert on tiny models, PNG and grid output, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from test_pipeline_cogview2 import build_tiny_pipeline, single_thread  # noqa: F401
from test_pipeline_cogview2 import spm_model as spm_model  # noqa: F401  (fixture)

from coglm_hf.cli import build_parser, main
from coglm_hf.demo import default_model_path
from coglm_hf.image_grid import CANVAS, GAP, grid_columns, make_grid
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
        assert "examples" in text
    if command == ["generate"]:
        assert "--prompt" in text and "--num-candidates" in text and "--grid" in text and "--seed" in text
        # the default model's own facts, not the official 480x480 / 1.15 / 16 / 100 / 40
        assert "Generate 240x240 images" in text and "10x10 tokens" in text and "30x30 tokens" in text
        assert "(default 2)" in text and "(default 2,2)" in text and "(default 0)" in text
        assert "480" not in text.split("examples (the real")[0] and "1.15" not in text
        # every word of the demo world is listed for the examples
        from coglm_hf.demo.shapes import COLORS, SHAPES

        assert all(word in text for word in [*COLORS, *SHAPES])
    if command == ["convert"]:
        assert "--sat-dir" in text and "cluster_label.npy" in text


def test_help_describes_the_model_passed(model_dir, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(model_dir), "--help"])
    text = capsys.readouterr().out
    assert f"Generate 96x96 images from text prompts with the model in {model_dir}" in text
    assert "4x4 tokens (stage 1) -> 12x12 tokens" in text


def test_help_and_parsing_import_no_torch():
    """`coglm-hf --help` must answer fast: neither the package nor the parser may import torch or Transformers."""
    script = ("import sys, coglm_hf, coglm_hf.cli as cli\n"
              "cli.build_parser().parse_args(['generate', 'a cat'])\n"
              "heavy = sorted(m for m in ('torch', 'transformers', 'diffusers', 'numpy') if m in sys.modules)\n"
              "print(heavy)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_first_public_name_registers_the_auto_classes():
    script = ("import sys, coglm_hf\n"
              "from coglm_hf import CogView2Scheduler  # noqa: F401  first use registers\n"
              "from transformers import AutoModel, AutoTokenizer\n"
              f"folder = {str(default_model_path())!r}\n"
              "print(type(AutoModel.from_pretrained(folder + '/base_model')).__name__,"
              " type(AutoTokenizer.from_pretrained(folder + '/tokenizer')).__name__)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["CogLMModel", "CogLMTokenizer"]


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
    grid = np.asarray(PIL.Image.open(out / "grid.png"))
    assert grid.shape[1] == 2 * 96 + GAP and grid.shape[0] > 2 * 96  # 2x2, a caption under each image
    np.testing.assert_array_equal(grid[:96, 96 + GAP:], images[1])
    caption = grid[96:grid.shape[0] // 2]
    assert caption.min() < 100 and np.median(caption) > 200  # dark text on a light canvas
    # a rerun writes new files next to the old ones
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and "grid-2.png" in stdout and len(list(out.iterdir())) == 10
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out / "00-a-cat-0-2.png")), images[0])
    # the files are exactly what the pipeline makes with the same seed and settings
    pipe = CogView2Pipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(["a cat", "a blue dog"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1),
                    itersr_top_k=3, sr_batch_size=3).images
    for image, reference in zip(images, expected):
        np.testing.assert_array_equal(image, np.asarray(reference))


def test_generate_warns_about_words_the_demo_does_not_know(tmp_path, capsys):
    code, _, err = run(["generate", "a tiger wearing VR glasses", "--only-first-stage", "--output-dir", tmp_path],
                       capsys)
    assert code == 0
    assert "coglm-hf generate: warning: " in err and "tiger, wearing, VR, glasses" in err and "triangle" in err


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
    assert args.num_images == 1 and args.style is None and args.dtype == "auto" and args.seed == 0
    assert args.threads is None
    assert [grid_columns(n) for n in (1, 2, 3, 4, 5, 9, 10)] == [1, 2, 2, 2, 3, 3, 4]
    tiles = [PIL.Image.new("RGB", (4, 3), c) for c in ("red", "green", "blue", "white")]
    grid = make_grid([tiles[:3], tiles[3:]])
    assert grid.size == (12 + 2 * GAP, 6 + GAP) and grid.getpixel((5 + GAP, 1)) == (0, 128, 0)
    assert grid.getpixel((4, 1)) == grid.getpixel((10, 4 + GAP)) == CANVAS  # the gap, the empty cell
    with pytest.raises(ValueError, match="one size"):
        make_grid([[tiles[0], PIL.Image.new("RGB", (5, 5))]])
    labelled = make_grid([[PIL.Image.new("RGB", (64, 64), "red")]], [["a red square on a blue background"]],
                         column_titles=["stage 1"])
    assert labelled.width == 64 and labelled.height > 64 + 12
