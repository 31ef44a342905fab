"""Editing adherence of a shapes-world pipeline (`coglm-hf evaluate`, the editing table).

Each trial is a two-shape source scene, one shape in the left half and one in the right half of the image. The
right half is masked (`EDIT_BOX`) and `CogView2InpaintPipeline` regenerates it for the caption of the *target*
scene, where the right shape is replaced by a shape of a new colour (a held-out scene key). The judge then asks:

* **new colour / new shape in the region**: an object of the prompted colour (and shape) whose centre lies in the
  masked half;
* **source removed**: the replaced shape's colour is gone from the masked half;
* **kept**: background and the left shape's colour are still there, left of the middle;
* **change outside**: mean absolute pixel change of the unmasked half (0–255; the VQ round trip alone costs a few).

The **control** row edits the same sources with a prompt naming another new colour and counts how often the
*first* prompt's colour appears anyway: what "toward the prompt" has to beat.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .evaluate import save_image_grid
from .judge import judge
from .shapes import (
    COLORS,
    HIRES_SIZE,
    PAIR_AXIS,
    PAIR_RADII,
    SHAPES,
    Scene,
    Shape,
    caption_en,
    is_held_out,
    lattice_offset,
    render,
)

# The right half of the image: its bounding box is the whole height, so the crop is the whole image and stage 1
# sees the kept half as context.
EDIT_BOX = (0.0, 0.5, 1.0, 1.0)


@dataclass(frozen=True)
class EditTrial:
    source: Scene  # shapes[0] kept (left), shapes[1] replaced (right)
    target: Scene  # the prompted scene: shapes[1] has a new colour and kind
    control_color: str  # another new colour, for the control prompt


@dataclass
class EditRow:
    name: str
    new_color: float
    new_shape: float
    source_removed: float
    kept: float
    change_outside: float
    images: int
    seconds_per_image: float


def edit_trials(num_trials: int, seed: int = 0) -> list[EditTrial]:
    """`num_trials` trials whose target scenes have held-out keys (never seen in training)."""
    if not isinstance(num_trials, int) or num_trials <= 0:
        raise ValueError(f"num_trials must be a positive int, got {num_trials!r}")
    rng = random.Random(f"edit/{seed}")
    colors = sorted(COLORS)
    trials: list[EditTrial] = []
    while len(trials) < num_trials:
        background, kept_color, old_color, new_color, control_color = rng.sample(colors, 5)
        kept_kind, old_kind, new_kind = (rng.choice(SHAPES) for _ in range(3))
        # placed as the world places "left of" scenes: on the lattice, the training sizes
        y_left, y_right = (120 + lattice_offset(rng) for _ in range(2))
        kept = Shape(kept_kind, kept_color, PAIR_AXIS[0], y_left, rng.choice(PAIR_RADII))
        right = dict(x=PAIR_AXIS[1], y=y_right, radius=rng.choice(PAIR_RADII))
        target = Scene(background, (kept, Shape(new_kind, new_color, **right)), "left of")
        if not is_held_out(target.key):
            continue
        source = Scene(background, (kept, Shape(old_kind, old_color, **right)), "left of")
        trials.append(EditTrial(source, target, control_color))
    return trials


def _score(image: Image.Image, source: Image.Image, trial: EditTrial, color: str, kind: str) -> tuple:
    judgement = judge(image)
    right = {(c, k) for c, k, x, _ in judgement.objects if x > 0.5}
    right_colors = {c for c, _ in right}
    kept = trial.source.shapes[0]
    kept_ok = judgement.background == trial.source.background and any(
        c == kept.color and x < 0.5 for c, _, x, _ in judgement.objects)
    after = np.asarray(image.convert("RGB").resize((HIRES_SIZE, HIRES_SIZE), Image.Resampling.BOX), dtype=np.float32)
    before = np.asarray(source, dtype=np.float32)
    change = float(np.abs(after - before)[:, : HIRES_SIZE // 2].mean())
    return color in right_colors, (color, kind) in right, trial.source.shapes[1].color not in right_colors, kept_ok, change


@torch.no_grad()
def editing_rows(pipeline, num_trials: int = 24, images_per_trial: int = 2, seed: int = 0,
                 grid_path: str | Path | None = None) -> list[EditRow]:
    """Edit every trial's source toward its target caption (and toward the control caption); one row each.

    `grid_path`: also write a PNG of the first 4 trials: source, target render, the edits, the control edits.
    """
    from ..pipeline_cogview2_inpaint import CogView2InpaintPipeline

    editor = CogView2InpaintPipeline.from_pipe(pipeline)
    editor.set_progress_bar_config(disable=True)
    trials = edit_trials(num_trials, seed)
    sources = [render(trial.source, HIRES_SIZE) for trial in trials]  # shared by both rows, the scores and the grid
    rows, outputs, prompts = [], [], []
    for name, control in (("edit toward the prompt", False), ("control: prompt names another colour", True)):
        scores, start = [], time.perf_counter()
        generator = torch.Generator(pipeline.device).manual_seed(seed)
        for trial, source in zip(trials, sources):
            new = trial.target.shapes[1]
            prompted = Scene(trial.target.background, (trial.target.shapes[0], Shape(
                new.kind, trial.control_color if control else new.color, new.x, new.y, new.radius)), "left of")
            prompts.append(caption_en(prompted))
            images = editor(prompts[-1], image=source, mask_box=EDIT_BOX,
                            num_images_per_prompt=images_per_trial, generator=generator).images
            scores += [_score(image, source, trial, new.color, new.kind) for image in images]
            outputs.append(images)
        columns = np.array(scores, dtype=np.float64)
        rows.append(EditRow(name, *columns[:, :4].mean(axis=0).tolist(), float(columns[:, 4].mean()), len(scores),
                            (time.perf_counter() - start) / len(scores)))
    if grid_path is not None:  # first 4 trials: source, target, the edits, the control edits
        edits, controls = outputs[: len(trials)], outputs[len(trials):]
        shown = range(min(4, len(trials)))
        titles = ["source", "target", *(f"edit {i + 1}" for i in range(images_per_trial)),
                  *(f"control {i + 1}" for i in range(images_per_trial))]
        save_image_grid(grid_path, [[sources[r], render(trials[r].target, HIRES_SIZE), *edits[r], *controls[r]]
                                    for r in shown], column_titles=titles,
                        row_captions=[f"{prompts[r]} (control: {trials[r].control_color})" for r in shown])
    return rows


def format_edit_table(rows: list[EditRow]) -> str:
    """Markdown table of the editing rows (rates of the *first* prompt's colour and shape, see the module doc)."""
    lines = ["| editing | new colour in region | new colour + shape | source removed | kept | change outside "
             "| images | s / image |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.new_color:.1%} | {r.new_shape:.1%} | {r.source_removed:.1%} | {r.kept:.1%} "
                     f"| {r.change_outside:.1f} | {r.images} | {r.seconds_per_image:.2f} |")
    return "\n".join(lines)


__all__ = ["EDIT_BOX", "EditRow", "EditTrial", "edit_trials", "editing_rows", "format_edit_table"]
