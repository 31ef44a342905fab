"""`coglm-hf evaluate`: prompt adherence of a pipeline on held-out prompts of the shapes world.

For every configuration the pipeline generates `images_per_prompt` images for each held-out prompt (English
captions of scene keys never seen in training) and the deterministic judge (`coglm_hf.demo.judge`) checks them.
Reported per configuration: adherence (right background and every prompted colour+shape present), colour
adherence (shapes ignored), relation accuracy (two-shape prompts), and seconds per image.

Reference rows:
* `chance`: ground-truth renders of random training-distribution scenes judged against the held-out prompts, i.e.
  the adherence of an image that ignores the prompt.
* `ground truth` / `VQ round trip`: renders of the prompted scenes, as they are and after `encode`/`decode` by the
  image tokenizer at both resolutions (the ceiling the token models can reach).
* `direct (+ iterative) SR of ground-truth 80 px tokens`: the super-resolution stages alone, on perfect input.

Configurations (the paper's claims about stage 1 and super-resolution):
* stage 1 with cluster sampling and text up-weighting (the default), without cluster sampling (plain sampling
  from the full distribution: every cluster, temperature 1), without text up-weighting (`c = 0`), and with
  post-selection (best of `num_candidates` by caption likelihood);
* the full pipeline (direct + iterative super-resolution), which must keep stage 1's adherence at 3× resolution.

A second table measures shape accuracy on one-shape held-out prompts (`shape_rows`): whether the largest region of
the prompted colour has the prompted shape, per kind and averaged over the four kinds (chance: 25 %).

With the SR stages present, a third table measures text-guided editing (`coglm_hf.demo.evaluate_editing`). A fourth
table measures captioning with the base model (`coglm_hf.demo.evaluate_captioning`).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..cli import add_evaluate_arguments
from .judge import judge, judge_scene
from .shapes import (
    HIRES_SIZE,
    LOWRES_SIZE,
    SHAPES,
    ShapesDataset,
    ShapesSample,
    caption_en,
    caption_zh,
    heldout_prompts,
    render,
    single_object_prompts,
)


@dataclass
class EvalRow:
    name: str
    adherence: float
    colors: float
    relation: float | None
    images: int
    seconds_per_image: float | None


def _row(name: str, verdicts: list, seconds: float | None = None) -> EvalRow:
    relations = [v.relation for v in verdicts if v.relation is not None]
    return EvalRow(
        name=name,
        adherence=float(np.mean([v.adherence for v in verdicts])),
        colors=float(np.mean([v.colors for v in verdicts])),
        relation=float(np.mean(relations)) if relations else None,
        images=len(verdicts),
        seconds_per_image=None if seconds is None else seconds / len(verdicts),
    )


def chance_row(prompts: list[ShapesSample], num_scenes: int = 200, seed: int = 0) -> EvalRow:
    """Adherence of prompt-ignoring images: renders of random scenes judged against every held-out prompt."""
    dataset = ShapesDataset(seed + 999, split="all")
    judgements = [judge(dataset[i].image(LOWRES_SIZE)) for i in range(num_scenes)]
    return _row("chance (random scenes)", [judge_scene(j, p.scene) for j in judgements for p in prompts])


def _renders(vq, scenes: list, size: int) -> torch.Tensor:
    """`[B, 3, size, size]` renders of `scenes` in [0, 1], on the image tokenizer's device and dtype."""
    return torch.stack([torch.from_numpy(np.asarray(render(scene, size), dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for scene in scenes]).to(vq.device, vq.dtype)


@torch.no_grad()
def round_trip(vq, scenes: list, size: int) -> np.ndarray:
    """Renders of `scenes` at `size` px after `encode`/`decode` by the image tokenizer: `[B, size, size, 3]` in [0, 1]."""
    return vq.decode(vq.encode(_renders(vq, scenes, size))).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


@torch.no_grad()
def super_resolve_ground_truth(pipeline, scenes: list, texts: list[str], seed: int = 0,
                               **sampler: object) -> dict[str, tuple[np.ndarray, float]]:
    """The SR stages alone on ground-truth input: 80 px renders -> 10x10 tokens -> direct SR (-> iterative SR) ->
    240 px. Returns name -> (decoded images `[B, 240, 240, 3]`, seconds since the start)."""
    low_res = pipeline.image_tokenizer.encode(_renders(pipeline.image_tokenizer, scenes, LOWRES_SIZE))
    ids = [pipeline.tokenizer.encode_prompt(text)[:-1] for text in texts]
    settings = pipeline.scheduler.sampler_settings("mainbody", **sampler)
    generator = torch.Generator(pipeline.device).manual_seed(seed)
    start = time.perf_counter()
    high = pipeline.direct_super_resolution(low_res, ids, settings, generator, batch_size=4)
    outputs = {"direct SR": (pipeline.decode(high, "np", 4), time.perf_counter() - start)}
    refined = pipeline.iterative_super_resolution(high, ids, settings, generator, 4)
    outputs["direct + iterative SR"] = (pipeline.decode(refined, "np", 4), time.perf_counter() - start)
    return outputs


def reference_rows(pipeline, prompts: list[ShapesSample]) -> list[EvalRow]:
    """Ground-truth renders and their VQ round trip at the stage-1 and the super-resolution size."""
    scenes = [p.scene for p in prompts]
    rows = [_row("ground truth renders", [judge_scene(judge(p.image(LOWRES_SIZE)), p.scene) for p in prompts])]
    for size in (LOWRES_SIZE, HIRES_SIZE):
        decoded = round_trip(pipeline.image_tokenizer, scenes, size)
        rows.append(_row(f"VQ round trip {size} px", [judge_scene(judge(d), s) for d, s in zip(decoded, scenes)]))
    return rows


def super_resolution_rows(pipeline, prompts: list[ShapesSample], texts: list[str], seed: int = 0,
                          **sampler: object) -> list[EvalRow]:
    """Rows of `super_resolve_ground_truth`: what super-resolution keeps, apart from what stage 1 gets right."""
    outputs = super_resolve_ground_truth(pipeline, [p.scene for p in prompts], texts, seed, **sampler)
    return [_row(f"{name} of ground-truth 80 px tokens", [judge_scene(judge(d), p.scene)
                                                          for d, p in zip(decoded, prompts)], seconds)
            for name, (decoded, seconds) in outputs.items()]


@dataclass
class ShapeRow:
    name: str
    shape: float  # mean over the kinds of the per-kind accuracies
    per_kind: dict[str, float]
    colors: float  # the prompted colour present, any shape
    images: int
    seconds_per_image: float | None


def _shape_row(name: str, verdicts: list, kinds: list[str], seconds: float | None = None) -> ShapeRow:
    per_kind = {kind: float(np.mean([v.shapes for v, k in zip(verdicts, kinds) if k == kind])) for kind in SHAPES}
    return ShapeRow(name, float(np.mean(list(per_kind.values()))), per_kind,
                    float(np.mean([v.colors for v in verdicts])), len(verdicts),
                    None if seconds is None else seconds / len(verdicts))


def shape_rows(pipeline, per_shape: int = 6, images_per_prompt: int = 2, seed: int = 0) -> list[ShapeRow]:
    """Shape accuracy on one-shape held-out prompts (`single_object_prompts`): does the largest region of the
    prompted colour have the prompted shape? Reference rows (renders, VQ round trips, the SR stages on ground-truth
    tokens), then stage 1 and the full pipeline, `images_per_prompt` images per prompt."""
    samples = single_object_prompts(per_shape)
    scenes, texts = [s.scene for s in samples], [s.caption_en for s in samples]
    kinds = [scene.shapes[0].kind for scene in scenes]
    rows = [_shape_row("ground truth renders", [judge_scene(judge(s.image(HIRES_SIZE)), s.scene) for s in samples],
                       kinds)]
    for size in (LOWRES_SIZE, HIRES_SIZE):
        decoded = round_trip(pipeline.image_tokenizer, scenes, size)
        rows.append(_shape_row(f"VQ round trip {size} px", [judge_scene(judge(d), s) for d, s in zip(decoded, scenes)],
                               kinds))
    has_sr = pipeline.dsr_model is not None and pipeline.itersr_model is not None
    if has_sr:  # where super-resolution loses shapes: after direct SR, after both SR stages
        for name, (decoded, seconds) in super_resolve_ground_truth(pipeline, scenes, texts, seed).items():
            rows.append(_shape_row(f"{name} of ground-truth 80 px tokens",
                                   [judge_scene(judge(d), s) for d, s in zip(decoded, scenes)], kinds, seconds))
    repeated = [scene for scene in scenes for _ in range(images_per_prompt)]
    stages = [("stage 1", {"only_first_stage": True})] + ([("full pipeline", {})] if has_sr else [])
    for name, kwargs in stages:
        start = time.perf_counter()
        images = generate(pipeline, texts, images_per_prompt, seed, **kwargs)
        rows.append(_shape_row(name, [judge_scene(judge(image), scene) for image, scene in zip(images, repeated)],
                               [kind for kind in kinds for _ in range(images_per_prompt)],
                               time.perf_counter() - start))
    return rows


def format_shape_table(rows: list[ShapeRow]) -> str:
    """Markdown table of the shape rows."""
    lines = ["| one-shape prompts | shape | " + " | ".join(SHAPES) + " | colour | images | s / image |",
             "|---|---|" + "---|" * len(SHAPES) + "---|---|---|"]
    for row in rows:
        speed = "–" if row.seconds_per_image is None else f"{row.seconds_per_image:.2f}"
        kinds = " | ".join(f"{row.per_kind[kind]:.0%}" for kind in SHAPES)
        lines.append(f"| {row.name} | {row.shape:.1%} | {kinds} | {row.colors:.1%} | {row.images} | {speed} |")
    return "\n".join(lines)


def configurations(pipeline, num_candidates: int = 4) -> dict[str, dict]:
    """Name -> pipeline keyword arguments (plus `_text_bias`: the text up-weighting c, `_language`: "zh" for the
    Chinese captions of the same prompts)."""
    num_clusters = int(pipeline.scheduler.cluster_labels.max()) + 1
    plain = {"temperature": 1.0, "top_k_clusters": num_clusters, "cluster_temperature": 1.0}
    return {
        "stage 1 (cluster sampling, text up-weighting)": {"only_first_stage": True},
        "stage 1 without cluster sampling": {"only_first_stage": True, **plain},
        "stage 1 without text up-weighting": {"only_first_stage": True, "_text_bias": 0.0},
        f"stage 1 + post-selection (best of {num_candidates})": {"only_first_stage": True,
                                                                  "num_candidates": num_candidates},
        "stage 1, Chinese prompts": {"only_first_stage": True, "_language": "zh"},
        "full pipeline (stage 1 + DSR + iterative SR)": {},
        f"full pipeline + post-selection (best of {num_candidates})": {"num_candidates": num_candidates},
    }


def generate(pipeline, prompts: list[str], images_per_prompt: int, seed: int, **kwargs) -> list[Image.Image]:
    """Images for `prompts` (grouped by prompt); `_text_bias` temporarily sets the base model's c."""
    bias = kwargs.pop("_text_bias", None)
    config = pipeline.base_model.config
    saved = config.text_attention_bias
    if bias is not None:
        config.text_attention_bias = bias
    try:
        generator = torch.Generator(pipeline.device).manual_seed(seed)
        return pipeline(prompts, num_images_per_prompt=images_per_prompt, generator=generator, **kwargs).images
    finally:
        config.text_attention_bias = saved


def evaluate(pipeline, num_prompts: int = 24, images_per_prompt: int = 2, seed: int = 0,
             configs: list[str] | None = None, grid_path: str | Path | None = None) -> list[EvalRow]:
    """Run every configuration (or those named in `configs`) and return the table rows, reference rows first.

    `grid_path`: also write a picture grid (one row per prompt of the first 6: ground truth, stage 1, full pipeline).
    """
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
    if not isinstance(images_per_prompt, int) or images_per_prompt <= 0:
        raise ValueError(f"images_per_prompt must be a positive int, got {images_per_prompt!r}")
    pipeline.set_progress_bar_config(disable=True)
    samples = heldout_prompts(num_prompts)
    texts = {"en": [caption_en(s.scene, random.Random(0)) for s in samples],
             "zh": [caption_zh(s.scene, random.Random(0)) for s in samples]}
    rows = [chance_row(samples), *reference_rows(pipeline, samples)]
    if pipeline.dsr_model is not None and pipeline.itersr_model is not None:
        rows += super_resolution_rows(pipeline, samples, texts["en"], seed)
    available = configurations(pipeline)
    unknown = sorted(set(configs or ()) - set(available))
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {sorted(available)}")
    outputs = {}
    for name, kwargs in available.items():
        if configs and name not in configs:
            continue
        kwargs = dict(kwargs)
        language = kwargs.pop("_language", "en")
        start = time.perf_counter()
        images = generate(pipeline, texts[language], images_per_prompt, seed, **kwargs)
        seconds = time.perf_counter() - start
        scenes = [s.scene for s in samples for _ in range(images_per_prompt)]
        rows.append(_row(name, [judge_scene(judge(image), scene) for image, scene in zip(images, scenes)], seconds))
        outputs[name] = images
    if grid_path is not None:
        write_grid(grid_path, samples, outputs, images_per_prompt)
    return rows


def save_image_grid(path: str | Path, rows: list[list[Image.Image]], column_titles: list[str] | None = None,
                    row_captions: list[str] | None = None, cell: int = 120) -> Path:
    """PNG of `rows` of images, each resized to `cell`×`cell` (box filter), titled by column, with each row's caption
    (its prompt) under its first image."""
    from ..image_grid import make_grid

    labels = None
    if row_captions is not None:
        labels = [[caption] + [""] * (len(row) - 1) for caption, row in zip(row_captions, rows)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels, column_titles, cell=cell, max_label_lines=4).save(path)
    return path


def write_grid(path: str | Path, samples: list[ShapesSample], outputs: dict[str, list[Image.Image]],
               images_per_prompt: int, rows: int = 6) -> Path:
    """PNG grid: per prompt, the ground truth then the first image of each configuration, at 120 px; columns titled
    by configuration, the prompt under the ground truth."""
    shown = samples[:rows]
    return save_image_grid(
        path, [[sample.image(HIRES_SIZE)] + [images[r * images_per_prompt] for images in outputs.values()]
               for r, sample in enumerate(shown)],
        column_titles=["ground truth", *outputs], row_captions=[caption_en(s.scene, random.Random(0)) for s in shown])


def format_table(rows: list[EvalRow]) -> str:
    """Markdown table of the rows."""
    lines = ["| configuration | adherence | colours | relation | images | s / image |", "|---|---|---|---|---|---|"]
    for row in rows:
        relation = "–" if row.relation is None else f"{row.relation:.1%}"
        speed = "–" if row.seconds_per_image is None else f"{row.seconds_per_image:.2f}"
        lines.append(f"| {row.name} | {row.adherence:.1%} | {row.colors:.1%} | {relation} | {row.images} | {speed} |")
    return "\n".join(lines)


def run_evaluate(args: argparse.Namespace) -> list[EvalRow]:
    """Entry point of `coglm-hf evaluate`: load, evaluate, print the tables (and write grid/JSON if asked)."""
    from ..pipeline_cogview2 import CogView2Pipeline
    from . import default_model_path
    from .evaluate_captioning import captioning_rows, format_caption_table
    from .evaluate_editing import editing_rows, format_edit_table

    if args.edits < 0:
        raise ValueError(f"--edits must be >= 0, got {args.edits}")
    if args.shapes_per_kind < 0:
        raise ValueError(f"--shapes-per-kind must be >= 0, got {args.shapes_per_kind}")
    if args.captions < 0:
        raise ValueError(f"--captions must be >= 0, got {args.captions}")
    pipeline = CogView2Pipeline.from_pretrained(args.model or default_model_path())
    rows = evaluate(pipeline, args.prompts, args.images_per_prompt, args.seed, args.configs, args.grid)
    print(format_table(rows))
    shapes = []
    if args.shapes_per_kind:
        shapes = shape_rows(pipeline, args.shapes_per_kind, args.images_per_prompt, args.seed)
        print()
        print(format_shape_table(shapes))
    edits = []
    if args.edits and pipeline.dsr_model is not None and pipeline.itersr_model is not None:
        edits = editing_rows(pipeline, args.edits, args.images_per_prompt, args.seed, args.edit_grid)
        print()
        print(format_edit_table(edits))
    captions = []
    if args.captions and pipeline.tokenizer is not None and pipeline.image_tokenizer is not None:
        scenes = [sample.scene for sample in heldout_prompts(args.captions)]
        captions = captioning_rows(pipeline, scenes, args.seed)
        print()
        print(format_caption_table(captions))
    if args.json:
        report = {"generation": [asdict(r) for r in rows], "shapes": [asdict(r) for r in shapes],
                  "editing": [asdict(r) for r in edits],
                  "captioning": [asdict(r) for r in captions]}
        Path(args.json).write_text(json.dumps(report, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coglm_hf.demo.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluate_arguments(parser)
    torch.set_num_threads(1)
    run_evaluate(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
