"""Captioning accuracy of a shapes-world pipeline (`coglm-hf evaluate`, the captioning table).

`CogView2CaptionPipeline` captions renders of held-out scenes (scene keys never seen in training, 240 px as a user
would upload them) and a parser reads each caption back into a scene description: the colour named before
"background" (背景), and every "colour shape" pair (红色圆形). Reported per decoding configuration, the share of
captions that name

* **background**: the right background colour;
* **object colours**: exactly the scene's object colours (as a set);
* **shapes**: exactly the scene's shape kinds (as a multiset, colours ignored);
* **objects**: exactly the scene's (colour, shape) pairs;
* **whole scene**: the background and every object, nothing more.

Reference rows: `chance` scores the true captions of random training-distribution scenes against the held-out
scenes (a caption that ignores the image), `ground-truth captions` checks the parser (100 %).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .shapes import COLORS, COLORS_ZH, HIRES_SIZE, SHAPES, SHAPES_ZH, Scene, ShapesDataset, caption_en, caption_zh

_EN_COLOR = "|".join(COLORS)
_EN_SHAPE = "|".join(SHAPES)
_EN_BACKGROUND = re.compile(rf"\b({_EN_COLOR}) background\b")
_EN_OBJECT = re.compile(rf"\b({_EN_COLOR}) ({_EN_SHAPE})\b")
_ZH_COLOR = {zh: en for en, zh in COLORS_ZH.items()}
_ZH_SHAPE = {zh: en for en, zh in SHAPES_ZH.items()}
_ZH_BACKGROUND = re.compile(f"({'|'.join(_ZH_COLOR)})背景")
_ZH_OBJECT = re.compile(f"({'|'.join(_ZH_COLOR)})({'|'.join(_ZH_SHAPE)})")


@dataclass(frozen=True)
class CaptionReading:
    """What a caption says: the background colour (None if it names none) and the (colour, shape) pairs."""

    background: str | None
    objects: tuple[tuple[str, str], ...]


def read_caption(caption: str) -> CaptionReading:
    """Parse an English or Chinese shapes-world caption (template words; anything else is ignored)."""
    background = _EN_BACKGROUND.search(caption)
    zh_background = _ZH_BACKGROUND.search(caption)
    objects = [(color, kind) for color, kind in _EN_OBJECT.findall(caption)]
    objects += [(_ZH_COLOR[color], _ZH_SHAPE[kind]) for color, kind in _ZH_OBJECT.findall(caption)]
    if background is not None:
        color = background.group(1)
    elif zh_background is not None:
        color = _ZH_COLOR[zh_background.group(1)]
    else:
        color = None
    return CaptionReading(color, tuple(objects))


@dataclass(frozen=True)
class CaptionScore:
    background: bool
    colors: bool
    shapes: bool
    objects: bool
    scene: bool


def score_caption(caption: str, scene: Scene) -> CaptionScore:
    """Compare what `caption` says with `scene` (see the module docstring for the criteria)."""
    reading = read_caption(caption)
    truth = [(shape.color, shape.kind) for shape in scene.shapes]
    background = reading.background == scene.background
    colors = {c for c, _ in reading.objects} == {c for c, _ in truth}
    shapes = Counter(k for _, k in reading.objects) == Counter(k for _, k in truth)
    objects = Counter(reading.objects) == Counter(truth)
    return CaptionScore(background, colors, shapes, objects, background and objects)


@dataclass
class CaptionRow:
    name: str
    background: float
    colors: float
    shapes: float
    objects: float
    scene: float
    captions: int
    seconds_per_image: float | None


def _row(name: str, verdicts: list[CaptionScore], seconds: float | None = None, images: int | None = None) -> CaptionRow:
    def share(field: str) -> float:
        return float(np.mean([getattr(v, field) for v in verdicts]))

    return CaptionRow(name, share("background"), share("colors"), share("shapes"), share("objects"), share("scene"),
                      len(verdicts), None if seconds is None else seconds / (images or len(verdicts)))


def chance_rows(scenes: list[Scene], num_scenes: int = 200, seed: int = 0) -> list[CaptionRow]:
    """True captions of random scenes scored against every held-out scene (a caption that ignores the image), and
    the true captions of the held-out scenes (the parser's check)."""
    dataset = ShapesDataset(seed + 999, split="all")
    random_captions = [caption_en(dataset[i].scene, random.Random(i)) for i in range(num_scenes)]
    chance = _row("chance (captions of random scenes)", [score_caption(c, s) for c in random_captions for s in scenes])
    truth = [score_caption(caption_en(s, random.Random(i)), s) for i, s in enumerate(scenes)]
    truth += [score_caption(caption_zh(s, random.Random(i)), s) for i, s in enumerate(scenes)]
    return [chance, _row("ground-truth captions (parser check, en + zh)", truth)]


def caption_configurations(num_candidates: int = 4) -> dict[str, dict]:
    """Name -> `CogView2CaptionPipeline` keyword arguments."""
    return {
        "greedy, English": {"language": "en"},
        "greedy, Chinese": {"language": "zh"},
        "beam search (4 beams), English": {"language": "en", "num_beams": 4},
        "sampling, English": {"language": "en", "do_sample": True},
        f"sampling, best of {num_candidates} by caption score": {"language": "en", "do_sample": True,
                                                                 "num_captions_per_image": num_candidates,
                                                                 "rank_by_score": True},
    }


@torch.no_grad()
def captioning_rows(pipeline, scenes: list[Scene], seed: int = 0, configs: list[str] | None = None,
                    examples: dict | None = None) -> list[CaptionRow]:
    """Caption 240 px renders of `scenes` with every configuration; reference rows first. `examples`, if given,
    receives the first configuration's captions (name -> list of first captions)."""
    from ..pipeline_cogview2_caption import CogView2CaptionPipeline
    from .shapes import render

    captioner = CogView2CaptionPipeline.from_pipe(pipeline)
    captioner.set_progress_bar_config(disable=True)
    images = [render(scene, HIRES_SIZE) for scene in scenes]
    rows = chance_rows(scenes)
    for name, kwargs in caption_configurations().items():
        if configs and name not in configs:
            continue
        generator = torch.Generator(captioner.device).manual_seed(seed)
        start = time.perf_counter()
        output = captioner(images, generator=generator, **kwargs)
        seconds = time.perf_counter() - start
        first = [captions[0] for captions in output.captions]
        rows.append(_row(name, [score_caption(c, s) for c, s in zip(first, scenes)], seconds, len(images)))
        if examples is not None:
            examples[name] = first
    return rows


def format_caption_table(rows: list[CaptionRow]) -> str:
    """Markdown table of the captioning rows."""
    lines = ["| captioning | background | object colours | shapes | objects | whole scene | captions | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = "–" if row.seconds_per_image is None else f"{row.seconds_per_image:.2f}"
        lines.append(f"| {row.name} | {row.background:.1%} | {row.colors:.1%} | {row.shapes:.1%} | "
                     f"{row.objects:.1%} | {row.scene:.1%} | {row.captions} | {speed} |")
    return "\n".join(lines)


__all__ = ["CaptionReading", "CaptionRow", "CaptionScore", "captioning_rows", "chance_rows", "format_caption_table",
           "read_caption", "score_caption"]
