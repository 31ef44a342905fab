"""`coglm-hf`: generate images, edit images and convert the official CogView2 files from the command line.

    coglm-hf generate "a yellow circle on a black background"          # the embedded demo model, seconds on a CPU
    coglm-hf generate --model converted/cogview2 --prompt "a tiger wearing VR glasses" --num-images 4 --grid
    coglm-hf edit --model converted/cogview2 --image photo.png --box 0.3,0.3,0.7,0.7 --prompt "a red hat"
    coglm-hf convert --sat-dir ~/.sat_models --cluster-labels cluster_label.npy \\
        --text-model ice_text.model --image-model ice_image.pt --output converted/cogview2

Without --model, `generate`, `edit` and `evaluate` use the small demo model shipped inside the package (trained by
this project on a procedural world of coloured shapes). For the real CogView2, `convert` the official files once, then
pass --model. Run `coglm-hf <command> --help` for every option.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import PIL.Image
import torch

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

GENERATE_EPILOG = """examples:
  coglm-hf generate --model converted/cogview2 --prompt "a cat sitting on a red sofa"
  coglm-hf generate --model converted/cogview2 --prompt "一只猫" --prompt "a lighthouse at dusk" \\
      --num-images 4 --num-candidates 8 --style photo --seed 1 --grid
  coglm-hf generate --model converted/cogview2 --prompt "a cat" --only-first-stage   # fast 20x20-token preview

Images are written as PNG files to --output-dir (one per image, plus grid.png with --grid).
A full run needs a GPU: the three CogView2 models take ~24 GB in half precision (--cpu-offload lowers that).
"""

EDIT_EPILOG = """examples:
  coglm-hf edit --model converted/cogview2 --image photo.jpg --mask mask.png --prompt "a bunch of flowers"
  coglm-hf edit --model converted/cogview2 --image photo.jpg --box 0.25,0.4,0.75,0.9 --prompt "a dog" -n 4

The image is resized (shorter side) and centre-cropped to 480x480. The mask is white where the image is
regenerated and must have the image's size; --box gives the region as top,left,bottom,right fractions (0..1) of the
square image instead.
"""

CONVERT_EPILOG = """examples:
  coglm-hf convert --sat-dir ~/.sat_models --cluster-labels CogView2/cluster_label.npy \\
      --text-model ~/.icetk_models/ice_text.model --image-model ~/.icetk_models/ice_image.pt \\
      --dtype float16 --output converted/cogview2

--sat-dir is the folder holding the three official model folders coglm/, cogview2-dsr/ and cogview2-itersr/
(SAT_HOME); pass --coglm/--dsr/--itersr to point at them one by one. Without --text-model the pipeline has no
tokenizer (prompt ids only); without --image-model it has no image tokenizer (token output only).
"""


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="converted pipeline folder (written by `coglm-hf convert` or save_pretrained); default: "
                             "the embedded demo model (shapes world)")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", default="outputs", metavar="DIR",
                        help="where the PNG files go (created if needed; default: outputs)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same images")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="model precision (default auto: float16 on GPU as the official code, float32 on CPU)")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="keep models on the CPU and move each to the GPU only while it runs (less GPU memory)")
    parser.add_argument("--grid", action="store_true", help="also write all images side by side as grid.png")
    parser.add_argument("--style", default=None,
                        help="prompt style: none, mainbody, photo, flat, comics, oil, sketch, isometric, chinese, "
                             "watercolor (default: mainbody for generate, none for edit)")
    group = parser.add_argument_group("sampling (defaults: the official values)")
    group.add_argument("--temperature", type=float, help="stage-1 temperature (1.15)")
    group.add_argument("--top-k-clusters", type=int, help="stage-1 clusters to sample from (16)")
    group.add_argument("--cluster-temperature", type=float, help="stage-1 temperature inside a cluster (1.0)")
    group.add_argument("--dsr-temperature", type=float, help="direct-SR temperature (1.0)")
    group.add_argument("--dsr-top-k-clusters", type=int, help="direct-SR clusters to sample from (100)")
    group.add_argument("--dsr-cluster-temperature", type=float, help="direct-SR temperature inside a cluster (0.89)")
    group.add_argument("--itersr-top-k", help="top-k of the 6 LoPAR passes: one number or six comma-separated "
                                              "(40,40,40,20,20,10)")
    group.add_argument("--itersr-temperature", type=float, help="LoPAR temperature (1.0)")
    group.add_argument("--stage1-batch-size", type=int, default=8, help="images generated together in stage 1 (8)")
    group.add_argument("--sr-batch-size", type=int, default=4, help="images per super-resolution chunk (4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coglm-hf", description=__doc__.strip().replace("`coglm-hf`: generate", "Generate"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,edit,convert,evaluate}")

    generate = commands.add_parser(
        "generate", help="text → 480x480 images", epilog=GENERATE_EPILOG,
        description="Generate 480x480 images from text prompts with CogView2:\n"
                    "20x20 tokens (stage 1) -> 60x60 tokens (super-resolution) -> pixels.",
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
    generate.add_argument("--only-first-stage", action="store_true",
                          help="skip super-resolution: a quick 20x20-token preview, upscaled to 480x480")
    _add_run_options(generate)

    edit = commands.add_parser(
        "edit", help="regenerate a region of an image to match a prompt", epilog=EDIT_EPILOG,
        description="Text-guided editing: CogView2 regenerates the masked region of an image so that it shows\n"
                    "the prompt, keeping the rest.",
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
    _add_run_options(edit)

    convert = commands.add_parser(
        "convert", help="official CogView2 files → a pipeline folder", epilog=CONVERT_EPILOG,
        description="Convert the official CogView2 checkpoints (SwissArmyTransformer folders), icetk's tokenizers\n"
                    "and the cluster table into one folder that `coglm-hf generate` and CogView2Pipeline load.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("--output", required=True, metavar="DIR", help="pipeline folder to write (atomically)")
    convert.add_argument("--sat-dir", metavar="DIR", help="folder holding coglm/, cogview2-dsr/, cogview2-itersr/")
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
    evaluate = commands.add_parser(
        "evaluate", help="prompt adherence of a shapes-world model (the demo) with a deterministic judge",
        description="Generate images for held-out prompts of the procedural shapes world and judge whether the\n"
                    "right shapes and colours are present: stage 1 alone and the full pipeline, with and without\n"
                    "cluster sampling, text up-weighting and post-selection. Prints a table with the chance level.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .demo.evaluate import add_arguments as add_evaluate_arguments

    add_evaluate_arguments(evaluate)
    return parser


def _sampler_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {name: getattr(args, name) for name in (
        "temperature", "top_k_clusters", "cluster_temperature", "dsr_temperature", "dsr_top_k_clusters",
        "dsr_cluster_temperature", "itersr_temperature")}
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


def _load(pipeline_cls, args: argparse.Namespace):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.model is None:
        from .demo import default_model_path

        args.model = str(default_model_path())
    elif not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model} is not a folder; convert the official files first with "
                                "`coglm-hf convert`")
    pipe = pipeline_cls.from_pretrained(args.model, dtype=dtype)
    if args.cpu_offload:
        if device.type != "cuda":
            raise ValueError("--cpu-offload needs a GPU (it moves each model to the GPU while it runs)")
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    generator = torch.Generator(device.type).manual_seed(args.seed)
    return pipe, generator


def _slug(text: str) -> str:
    slug = re.sub(r"[^\w]+", "-", text, flags=re.UNICODE).strip("-").lower()
    return slug[:40] or "prompt"


def make_grid(images: list[PIL.Image.Image], columns: int = 3) -> PIL.Image.Image:
    """Tile images (all of one size) row by row, `columns` per row (the official script saves 3 per row)."""
    width, height = images[0].size
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = PIL.Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def _save_images(images: list[PIL.Image.Image], names: list[str], args: argparse.Namespace) -> list[Path]:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for image, name in zip(images, names):
        path = output_dir / f"{name}.png"
        image.save(path)
        written.append(path)
    if args.grid:
        path = output_dir / "grid.png"
        make_grid(images).save(path)
        written.append(path)
    return written


def run_generate(args: argparse.Namespace) -> list[Path]:
    from .pipeline_cogview2 import CogView2Pipeline

    args.prompt = list(args.prompts) + list(args.prompt)
    if not args.prompt:
        raise ValueError('give at least one prompt, e.g. coglm-hf generate "a yellow circle on a black background"')
    pipe, generator = _load(CogView2Pipeline, args)
    output = pipe(
        prompt=args.prompt, num_images_per_prompt=args.num_images, num_candidates=args.num_candidates,
        style=args.style or "mainbody", only_first_stage=args.only_first_stage, generator=generator,
        output_type="pil", **_sampler_kwargs(args),
    )
    names = [f"{p:02d}-{_slug(prompt)}-{i}" for p, prompt in enumerate(args.prompt) for i in range(args.num_images)]
    return _save_images(output.images, names, args)


def run_edit(args: argparse.Namespace) -> list[Path]:
    from .pipeline_cogview2_inpaint import CogView2InpaintPipeline

    if not Path(args.image).is_file():
        raise FileNotFoundError(f"--image {args.image} not found")
    image = PIL.Image.open(args.image).convert("RGB")
    mask = box = None
    if args.mask is not None:
        if not Path(args.mask).is_file():
            raise FileNotFoundError(f"--mask {args.mask} not found")
        mask = PIL.Image.open(args.mask)
    else:
        try:
            box = [float(v) for v in args.box.split(",")]
        except ValueError:
            raise ValueError(f"--box must be four comma-separated fractions top,left,bottom,right, got {args.box!r}") \
                from None
    pipe, generator = _load(CogView2InpaintPipeline, args)
    output = pipe(prompt=args.prompt, image=image, mask_image=mask, mask_box=box, num_images_per_prompt=args.num_images,
                  style=args.style or "none", generator=generator, output_type="pil", **_sampler_kwargs(args))
    names = [f"edit-{_slug(args.prompt)}-{i}" for i in range(args.num_images)]
    return _save_images(output.images, names, args)


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


COMMANDS = {"generate": run_generate, "edit": run_edit, "convert": run_convert, "evaluate": run_evaluate}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `coglm-hf` command; returns the exit code (0 ok, 1 error, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    try:
        written = COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"coglm-hf {args.command}: error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
