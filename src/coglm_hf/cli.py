"""`coglm-hf`: generate, edit and caption images, serve the web app and convert the official CogView2 files.

    coglm-hf generate "a yellow circle on a black background"          # the embedded demo model, seconds on a CPU
    coglm-hf generate "a red star on a white background" -n 4 --grid    # four images and a labelled grid
    coglm-hf convert --sat-dir ~/.sat_models --cluster-labels cluster_label.npy \\
        --text-model ice_text.model --image-model ice_image.pt --output converted/cogview2
    coglm-hf generate --model converted/cogview2 "a tiger wearing VR glasses"   # the real CogView2 (GPU)
    coglm-hf caption photo.png --language en --num-captions 3          # image -> text
    coglm-hf serve                                                      # web app (pip install "coglm-hf[app]")

Without --model, `generate`, `edit`, `caption`, `serve` and `evaluate` use the small demo model shipped inside the
package (trained by this project on a procedural world of coloured shapes: it knows only its colour, shape and
position words). For the real CogView2, `convert` the official files once, then pass --model. `coglm-hf <command> --help` lists every option
with the values of the model it would load (pass --model before --help for another model).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
STYLES = ("none", "mainbody", "photo", "flat", "comics", "oil", "sketch", "isometric", "chinese", "watercolor")
DEFAULT_SEED = 0
# Models below this hidden size run on one CPU thread by default: their matrices are too small for a second thread
# to pay for its synchronisation (demo model, 2-core machine: 1.5 s of CPU per image with one thread, 14-18 s with
# two, which spin at every barrier; docs/pipeline.md).
SMALL_MODEL_HIDDEN_SIZE = 1024
SAMPLER_OPTIONS = (  # (knob, option help) in the order of the pipeline's stages
    ("temperature", "stage-1 temperature"),
    ("top_k_clusters", "stage-1 clusters to sample from"),
    ("cluster_temperature", "stage-1 temperature inside a cluster"),
    ("dsr_temperature", "direct-SR temperature"),
    ("dsr_top_k_clusters", "direct-SR clusters to sample from"),
    ("dsr_cluster_temperature", "direct-SR temperature inside a cluster"),
    ("itersr_top_k", "top-k of the LoPAR passes: one number or one per pass, comma-separated"),
    ("itersr_temperature", "LoPAR temperature"),
)

# the words of the demo's shapes world (coglm_hf.demo.shapes; not imported here: it loads numpy)
DEMO_EXAMPLES = """examples (the embedded demo model; it knows only the words of its shapes world: the colours red,
green, blue, yellow, purple, white, black; the shapes circle, square, triangle, star; small, large, above, below,
to the left of, to the right of, on a … background):
"""

GENERATE_EPILOG = DEMO_EXAMPLES + """\
  coglm-hf generate "a yellow circle on a black background"
  coglm-hf generate "a red star on a white background" "a small blue square on a yellow background" -n 4 --grid
  coglm-hf generate "a green triangle on a purple background" --only-first-stage   # stage 1 alone, upscaled

examples (the real CogView2: convert it first, see `coglm-hf convert --help`; a GPU with ~24 GB in float16):
  coglm-hf generate --model converted/cogview2 "a tiger wearing VR glasses" -n 4 --num-candidates 8 --grid
  coglm-hf generate --model converted/cogview2 --prompt "一只猫" --prompt "a lighthouse at dusk" --style photo

Images are written as PNG files to --output-dir, one per image (NN-<prompt>-<i>.png); --grid adds one labelled
grid of the run. Existing files are never overwritten: a rerun gets names ending in -2, -3, ….
"""

EDIT_EPILOG = DEMO_EXAMPLES + """\
  coglm-hf generate "a red circle to the left of a blue square on a white background"
  coglm-hf edit --image outputs/00-a-red-circle-to-the-left-of-a-blue-square-on-a-white-background-0.png \\
      --box 0,0.5,1,1 --prompt "a red circle to the left of a yellow star on a white background" -n 4 --grid

examples (the real CogView2, converted with `coglm-hf convert`):
  coglm-hf edit --model converted/cogview2 --image photo.jpg --mask mask.png --prompt "a bunch of flowers"
  coglm-hf edit --model converted/cogview2 --image photo.jpg --box 0.25,0.4,0.75,0.9 --prompt "a dog" -n 4

The image is resized (shorter side) and centre-cropped to the model's image size. The mask is white where the image
is regenerated and must have the image's size; --box gives the region as top,left,bottom,right fractions (0..1) of
the square image instead.
"""

CAPTION_EPILOG = """examples:
  coglm-hf caption photo.png                                   # greedy, English
  coglm-hf caption a.png b.jpg --language zh --num-captions 3  # 3 beams each, best caption score first
  coglm-hf caption photo.png --num-captions 4 --sample --seed 1

One caption per line; with several images each line starts with the file name. The image is resized (shorter
side) and centre-cropped to the stage-1 size (160x160 for CogView2) and encoded into 20x20 tokens.
"""

SERVE_EPILOG = """examples:
  coglm-hf serve                                   # the demo model on http://127.0.0.1:7860
  coglm-hf serve --model converted/cogview2 --device cuda --port 8080

Needs the app extra: pip install "coglm-hf[app]". The app runs offline (no analytics, nothing fetched from the
network); its named API endpoints /generate, /edit and /caption can be called with gradio_client.
"""

CONVERT_EPILOG = """examples:
  coglm-hf convert --sat-dir ~/.sat_models --cluster-labels CogView2/cluster_label.npy \\
      --text-model ~/.icetk_models/ice_text.model --image-model ~/.icetk_models/ice_image.pt \\
      --dtype float16 --output converted/cogview2

--sat-dir is the folder holding the three official models: the folders coglm/, cogview2-dsr/ and cogview2-itersr/
(SAT_HOME), the same under the Hugging Face mirror's sharefs/cogview-new/, or the zips coglm.zip, cogview2-dsr.zip,
cogview2-itersr.zip as downloaded; pass --coglm/--dsr/--itersr to point at folders one by one. One model is in
memory at a time (about the size of its checkpoint file). Without --text-model the pipeline has no
tokenizer (prompt ids only); without --image-model it has no image tokenizer (token output only).
"""


# ---------------------------------------------------------------------------------------------- the model's facts


@dataclass
class ModelFacts:
    """What `--help` says about a pipeline folder, read from its JSON configs (no weights, no torch)."""

    name: str
    stage1_grid: int | None = None
    hires_grid: int | None = None
    compress_rate: int | None = None
    hidden_size: int | None = None
    sampler: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int | None:
        """Side in pixels of the full pipeline's images."""
        grid = self.hires_grid or self.stage1_grid
        return grid * self.compress_rate if grid and self.compress_rate else None

    def size_text(self) -> str:
        size = self.image_size
        return f"{size}x{size}" if size else "square"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def default_model_dir() -> Path:
    """The embedded demo model's folder (light: imports no torch)."""
    from .demo import WEIGHTS_DIR

    return WEIGHTS_DIR


def describe_model(model: str | None) -> ModelFacts:
    """Facts of the pipeline folder `model` (None: the embedded demo model); what cannot be read stays None."""
    folder = default_model_dir() if model is None else Path(model)
    name = "the embedded demo model (shapes world)" if model is None else f"the model in {model}"
    base, dsr = _read_json(folder / "base_model" / "config.json"), _read_json(folder / "dsr_model" / "config.json")
    sampler = _read_json(folder / "scheduler" / "scheduler_config.json")
    return ModelFacts(
        name=name, stage1_grid=base.get("image_grid_size"), hires_grid=dsr.get("hires_grid_size"),
        compress_rate=_read_json(folder / "image_tokenizer" / "config.json").get("compress_rate"),
        hidden_size=base.get("hidden_size"),
        sampler={knob: sampler[knob] for knob, _ in SAMPLER_OPTIONS if knob in sampler},
    )


def _model_in(argv: list[str]) -> str | None:
    """The --model value of a command line, found before parsing (so that --help can describe that model)."""
    for index, arg in enumerate(argv):
        if arg == "--model" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--model="):
            return arg.partition("=")[2]
    return None


# ---------------------------------------------------------------------------------------------- the parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="pipeline folder (written by `coglm-hf convert` or save_pretrained); default: the "
                             "embedded demo model (shapes world, 240x240)")


def _add_run_options(parser: argparse.ArgumentParser, facts: ModelFacts, default_style: str) -> None:
    parser.add_argument("--output-dir", default="outputs", metavar="DIR",
                        help="where the PNG files go (created if needed; default: outputs)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                        help=f"random seed; the same seed and options give the same images (default {DEFAULT_SEED})")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="model precision (default auto: float16 on GPU as the official code, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help=f"CPU threads for torch (default: 1 for small models such as the demo, hidden size < "
                             f"{SMALL_MODEL_HIDDEN_SIZE}, where more threads are slower; else one per core)")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="keep models on the CPU and move each to the GPU only while it runs (less GPU memory)")
    parser.add_argument("--grid", action="store_true",
                        help="also write one labelled grid of all the run's images (square-ish)")
    parser.add_argument("--style", default=None, metavar="STYLE",
                        help=f"prompt style: {', '.join(STYLES)} (default: {default_style})")
    group = parser.add_argument_group(f"sampling (defaults: {facts.name}'s scheduler config)")
    for knob, text in SAMPLER_OPTIONS:
        value = facts.sampler.get(knob)
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        kind = str if knob == "itersr_top_k" else int if "top_k" in knob else float
        group.add_argument(f"--{knob.replace('_', '-')}", type=kind,
                           help=text + (f" (default {value})" if value is not None else ""))
    group.add_argument("--stage1-batch-size", type=int, default=8, help="images generated together in stage 1 (8)")
    group.add_argument("--sr-batch-size", type=int, default=4, help="images per super-resolution chunk (4)")


def _add_generate_command(commands, facts: ModelFacts) -> None:
    size = facts.size_text()
    grids = (f"{facts.stage1_grid}x{facts.stage1_grid} tokens (stage 1) -> {facts.hires_grid}x{facts.hires_grid} "
             "tokens (super-resolution) -> pixels" if facts.stage1_grid and facts.hires_grid else "")
    generate = commands.add_parser(
        "generate", help=f"text -> images ({size} with the default model)",
        epilog=GENERATE_EPILOG,
        description=f"Generate {size} images from text prompts with {facts.name}" + (f":\n{grids}." if grids else "."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_argument(generate)
    generate.add_argument("prompts", nargs="*", metavar="PROMPT", help="what to draw (English or Chinese)")
    generate.add_argument("--prompt", action="append", default=[],
                          help="what to draw (same as a positional PROMPT); repeat the option for several prompts")
    generate.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    generate.add_argument("--num-candidates", type=int, default=None,
                          help="generate this many first-stage candidates per prompt and keep the --num-images "
                               "that fit the prompt best (post-selection by caption likelihood)")
    preview = f"{facts.stage1_grid}x{facts.stage1_grid}-token" if facts.stage1_grid else "stage-1"
    generate.add_argument("--only-first-stage", action="store_true",
                          help=f"skip super-resolution: a quick {preview} preview, upscaled to {size}")
    _add_run_options(generate, facts, "mainbody")


def _add_edit_command(commands, facts: ModelFacts) -> None:
    edit = commands.add_parser(
        "edit", help="regenerate a region of an image to match a prompt",
        epilog=EDIT_EPILOG,
        description=f"Text-guided editing with {facts.name}: it regenerates the masked region of an image\n"
                    f"({facts.size_text()}) so that it shows the prompt, keeping the rest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_argument(edit)
    edit.add_argument("--prompt", required=True, help="what the edited region should show")
    edit.add_argument("--image", required=True, metavar="FILE", help="the image to edit (PNG, JPEG, …)")
    region = edit.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", metavar="FILE", help="mask image, white where to regenerate, same size as --image")
    region.add_argument("--box", metavar="TOP,LEFT,BOTTOM,RIGHT",
                        help="region to regenerate as fractions (0..1) of the square image, e.g. 0.3,0.3,0.7,0.7")
    edit.add_argument("-n", "--num-images", type=int, default=1, help="edited versions to make (default 1)")
    _add_run_options(edit, facts, "none")


def _add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="model precision (default auto: float16 on GPU, float32 on CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for small models such as the demo, else torch's)")


def _add_caption_command(commands) -> None:
    caption = commands.add_parser(
        "caption", help="image → text (CogLM captioning)", epilog=CAPTION_EPILOG,
        description="Caption images with the CogLM base model: the image becomes stage-1 tokens and the caption\n"
                    "is generated after a language tag, as in CogLM's pretraining captioning rows.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_argument(caption)
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, …)")
    caption.add_argument("--language", choices=("en", "zh"), default="en", help="caption language (default en)")
    caption.add_argument("--num-captions", type=int, default=1,
                         help="captions per image (default 1; more use beam search unless --sample), ranked by "
                              "caption score")
    caption.add_argument("--sample", action="store_true", help="sample captions instead of greedy / beam search")
    caption.add_argument("--num-beams", type=int, default=None,
                         help="beam width (default: 1 for one caption, else max(4, --num-captions))")
    caption.add_argument("--max-new-tokens", type=int, default=None, help="longest caption in tokens")
    caption.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed of --sample ({DEFAULT_SEED})")
    _add_device_options(caption)


def _add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve", help="web app: generate, edit and caption in the browser", epilog=SERVE_EPILOG,
        description="Start the Gradio app (three tabs: Generate, Edit, Caption) on the given model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--max-images", type=int, default=4, help="most images one request may ask for (default 4)")
    _add_device_options(serve)


def _add_convert_command(commands) -> None:
    convert = commands.add_parser(
        "convert", help="official CogView2 files -> a pipeline folder", epilog=CONVERT_EPILOG,
        description="Convert the official CogView2 checkpoints (SwissArmyTransformer folders), icetk's tokenizers\n"
                    "and the cluster table into one folder that `coglm-hf generate` and CogView2Pipeline load.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("--output", required=True, metavar="DIR", help="pipeline folder to write (atomically)")
    convert.add_argument("--sat-dir", metavar="DIR", help="folder holding coglm/, cogview2-dsr/, cogview2-itersr/ "
                                                         "(or their zips)")
    convert.add_argument("--coglm", metavar="DIR", help="the coglm folder (overrides --sat-dir)")
    convert.add_argument("--dsr", metavar="DIR", help="the cogview2-dsr folder (overrides --sat-dir)")
    convert.add_argument("--itersr", metavar="DIR", help="the cogview2-itersr folder (overrides --sat-dir)")
    convert.add_argument("--cluster-labels", required=True, metavar="FILE", help="CogView2's cluster_label.npy")
    convert.add_argument("--text-model", metavar="FILE", help="icetk's ice_text.model (text tokenizer)")
    convert.add_argument("--image-model", metavar="FILE", help="icetk's ice_image.pt (image tokenizer)")
    convert.add_argument("--image-config", metavar="FILE", help="JSON with the image tokenizer's architecture, for "
                                                                 "non-official (e.g. narrow) ice_image.pt files")
    convert.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                         help="dtype of the saved weights (default float32)")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    convert.add_argument("--no-deduplicate", action="store_true",
                         help="write tensors shared by several models once per model instead of once in all")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `coglm-hf evaluate` (shared with `python -m coglm_hf.demo.evaluate`)."""
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded demo model)")
    parser.add_argument("--prompts", type=int, default=24, help="held-out prompts (default 24)")
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    parser.add_argument("--config", action="append", default=None, dest="configs",
                        help="run only this configuration (repeatable); default: all")
    parser.add_argument("--shapes-per-kind", type=int, default=6,
                        help="one-shape held-out prompts per shape kind for the shape table (default 6; 0: skip)")
    parser.add_argument("--edits", type=int, default=24,
                        help="editing trials for the editing table (0: skip; needs the SR stages)")
    parser.add_argument("--captions", type=int, default=24,
                        help="held-out scenes for the captioning table (0: skip)")
    parser.add_argument("--grid", default=None, help="write a picture grid PNG here")
    parser.add_argument("--edit-grid", default=None, help="write a picture grid of edits PNG here")
    parser.add_argument("--json", default=None, help="write the rows as JSON here")


def _add_evaluate_command(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="prompt adherence of a shapes-world model (the demo) with a deterministic judge",
        description="Generate images for held-out prompts of the procedural shapes world and judge whether the\n"
                    "right shapes and colours are present: stage 1 alone and the full pipeline, with and without\n"
                    "cluster sampling, text up-weighting and post-selection. Prints a table with the chance level.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_evaluate_arguments(evaluate)


def build_parser(model: str | None = None) -> argparse.ArgumentParser:
    """The `coglm-hf` parser; `generate`/`edit` help texts describe the pipeline folder `model` (default: demo)."""
    parser = argparse.ArgumentParser(
        prog="coglm-hf", description=__doc__.strip().replace("`coglm-hf`: generate", "Generate"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,edit,caption,serve,convert,evaluate}")
    facts = describe_model(model)
    _add_generate_command(commands, facts)
    _add_edit_command(commands, facts)
    _add_caption_command(commands)
    _add_serve_command(commands)
    _add_convert_command(commands)
    _add_evaluate_command(commands)
    return parser


# ---------------------------------------------------------------------------------------------- running


def _sampler_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {knob: getattr(args, knob) for knob, _ in SAMPLER_OPTIONS if knob != "itersr_top_k"}
    if args.itersr_top_k is not None:
        try:
            values = [int(v) for v in args.itersr_top_k.split(",")]
        except ValueError:
            raise ValueError(f"--itersr-top-k must be one integer or comma-separated integers, got "
                             f"{args.itersr_top_k!r}") from None
        kwargs["itersr_top_k"] = values[0] if len(values) == 1 else values
    kwargs["stage1_batch_size"] = args.stage1_batch_size
    kwargs["sr_batch_size"] = args.sr_batch_size
    return kwargs


def _set_threads(args: argparse.Namespace, facts: ModelFacts) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif facts.hidden_size is not None and facts.hidden_size < SMALL_MODEL_HIDDEN_SIZE:
        torch.set_num_threads(1)


def _device(name: str | None):
    """`--device` → a usable torch.device, or a ValueError saying what exists on this machine."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: only cpu, cuda[:N] and mps are supported")
    return device


def _check_writable(folder: str) -> None:
    """Fail before any generation when `--output-dir` cannot be created or written."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output-dir {path} is a file; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise PermissionError(f"--output-dir {path} is not writable ({error.strerror or error}); choose another "
                              "folder") from None


def _open_image(path: str, flag: str):
    import PIL.Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path} not found")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (PIL.UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"{flag} {path} is not an image file PIL can read ({error}); pass a PNG or JPEG") from None


def _load(pipeline_cls, args: argparse.Namespace):
    import torch

    device = _device(args.device)
    if args.cpu_offload and device.type != "cuda":
        raise ValueError("--cpu-offload needs a GPU (it moves each model to the GPU while it runs)")
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model} is not a folder; convert the official files first with "
                                "`coglm-hf convert`")
    folder = args.model
    if folder is None:
        from .demo import default_model_path

        folder = str(default_model_path())
    _set_threads(args, describe_model(args.model))
    pipe = pipeline_cls.from_pretrained(folder, dtype=dtype)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    generator = torch.Generator(device.type).manual_seed(args.seed)
    return pipe, generator


def _slug(text: str) -> str:
    slug = re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-").lower()
    return slug[:80] or "prompt"


def _unused_path(folder: Path, stem: str, taken: set[Path]) -> Path:
    """`folder/stem.png`, or `stem-2.png`, `stem-3.png`, … when that file exists (or this run already chose it)."""
    path, number = folder / f"{stem}.png", 1
    while path.exists() or path in taken:
        number += 1
        path = folder / f"{stem}-{number}.png"
    return path


def _save_images(images: list, names: list[str], labels: list[str], args: argparse.Namespace) -> list[Path]:
    """Write one PNG per image (never over an existing file) and, with --grid, one labelled square-ish grid."""
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for image, name in zip(images, names):
        path = _unused_path(output_dir, name, set(written))
        image.save(path)
        written.append(path)
    if args.grid:
        from .image_grid import grid_columns, make_grid

        columns = grid_columns(len(images))
        rows = [images[i:i + columns] for i in range(0, len(images), columns)]
        captions = [labels[i:i + columns] for i in range(0, len(labels), columns)]
        path = _unused_path(output_dir, "grid", set(written))
        make_grid(rows, captions).save(path)
        written.append(path)
    return written


def run_generate(args: argparse.Namespace) -> list[Path]:
    from .pipeline_cogview2 import CogView2Pipeline

    prompts = list(args.prompts) + list(args.prompt)
    if not prompts:
        raise ValueError('give at least one prompt, e.g. coglm-hf generate "a yellow circle on a black background"')
    sampler_kwargs = _sampler_kwargs(args)  # bad option values fail before the model loads
    _check_writable(args.output_dir)
    pipe, generator = _load(CogView2Pipeline, args)
    output = pipe(
        prompt=prompts, num_images_per_prompt=args.num_images, num_candidates=args.num_candidates,
        style=args.style or "mainbody", only_first_stage=args.only_first_stage, generator=generator,
        output_type="pil", **sampler_kwargs,
    )
    names = [f"{p:02d}-{_slug(prompt)}-{i}" for p, prompt in enumerate(prompts) for i in range(args.num_images)]
    labels = [f"{prompt} (#{i}, seed {args.seed})" for prompt in prompts for i in range(args.num_images)]
    return _save_images(output.images, names, labels, args)


def run_edit(args: argparse.Namespace) -> list[Path]:
    from .pipeline_cogview2_inpaint import CogView2InpaintPipeline

    image = _open_image(args.image, "--image").convert("RGB")
    mask = box = None
    if args.mask is not None:
        mask = _open_image(args.mask, "--mask")
    else:
        try:
            box = [float(v) for v in args.box.split(",")]
        except ValueError:
            raise ValueError(f"--box must be four comma-separated fractions top,left,bottom,right, got {args.box!r}") \
                from None
    sampler_kwargs = _sampler_kwargs(args)
    _check_writable(args.output_dir)
    pipe, generator = _load(CogView2InpaintPipeline, args)
    output = pipe(prompt=args.prompt, image=image, mask_image=mask, mask_box=box, num_images_per_prompt=args.num_images,
                  style=args.style or "none", generator=generator, output_type="pil", **sampler_kwargs)
    names = [f"edit-{_slug(args.prompt)}-{i}" for i in range(args.num_images)]
    labels = [f"{args.prompt} (#{i}, seed {args.seed})" for i in range(args.num_images)]
    return _save_images(output.images, names, labels, args)


def run_caption(args: argparse.Namespace) -> list[Path]:
    import PIL.Image

    from .pipeline_cogview2_caption import CogView2CaptionPipeline

    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")
    images = []
    for path in args.images:
        try:
            with PIL.Image.open(path) as image:
                images.append(image.convert("RGB"))
        except PIL.UnidentifiedImageError:
            raise ValueError(f"{path} is not an image file PIL can read (PNG, JPEG, …)") from None
    if args.num_captions < 1:
        raise ValueError(f"--num-captions must be at least 1, got {args.num_captions}")
    args.cpu_offload = False
    pipe, generator = _load(CogView2CaptionPipeline, args)
    pipe.set_progress_bar_config(disable=True)
    num_beams = args.num_beams or (1 if args.sample or args.num_captions == 1 else max(4, args.num_captions))
    output = pipe(images, language=args.language, num_captions_per_image=args.num_captions, do_sample=args.sample,
                  num_beams=num_beams, max_new_tokens=args.max_new_tokens, rank_by_score=args.num_captions > 1,
                  generator=generator)
    for path, captions in zip(args.images, output.captions):
        for text in captions:
            print(f"{path}: {text}" if len(args.images) > 1 else text)
    return []


def run_serve(args: argparse.Namespace) -> list[Path]:
    from .app import serve

    if args.model is not None and not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model} is not a folder; convert the official files first with "
                                "`coglm-hf convert`")
    _set_threads(args, describe_model(args.model))
    serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          max_images=args.max_images)
    return []


def run_convert(args: argparse.Namespace) -> list[Path]:
    from .convert_cogview2 import convert_cogview2

    output = convert_cogview2(
        args.output, sat_dir=args.sat_dir, coglm_dir=args.coglm, dsr_dir=args.dsr, itersr_dir=args.itersr,
        cluster_labels=args.cluster_labels, text_model=args.text_model, image_model=args.image_model,
        image_config=args.image_config, dtype=args.dtype, max_shard_size=args.max_shard_size,
        overwrite=args.overwrite, deduplicate=not args.no_deduplicate,
    )
    return [output]


def run_evaluate(args: argparse.Namespace) -> list[Path]:
    from .demo.evaluate import run_evaluate as evaluate_demo

    evaluate_demo(args)
    return [Path(path) for path in (args.grid, args.json) if path]


COMMANDS = {"generate": run_generate, "edit": run_edit, "caption": run_caption, "serve": run_serve,
            "convert": run_convert, "evaluate": run_evaluate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `coglm-hf` command; returns the exit code (0 ok, 1 error, 2 bad arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_model_in(argv)).parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"coglm-hf {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show_warning  # one line each, as the errors (catch_warnings restores it)
            written = COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError) as error:  # OSError: missing, unwritable or unreadable files
        print(f"coglm-hf {args.command}: error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
