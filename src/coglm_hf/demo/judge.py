"""A deterministic judge of the shapes world: which background, which (colour, shape) objects does an image show?

1. The image is box-filtered to `JUDGE_SIZE` pixels; every pixel takes the nearest palette colour, or none when it is
   farther than `max_color_distance` from all of them (blurry edges, decoder artefacts).
2. The most frequent colour is the background. Every other colour's largest 4-connected component, if it covers at
   least `min_area` pixels, is an object.
3. The object's shape is the nearest class prototype in (fill ratio of the bounding box, solidity = area / convex
   hull area) space. The prototypes are the mean features of ground-truth renders of every shape at the world's
   sizes, measured once (`shape_prototypes`).

`judge_scene` compares a judgement with a prompt's scene; `adherence` is the strict criterion reported in docs/demo.md:
right background and every prompted (colour, shape) present.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .shapes import COLORS, SHAPES, Scene, Shape, render

JUDGE_SIZE = 80
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Judgement:
    """What the judge sees: background colour, objects as (colour, shape, centre x, centre y) in [0, 1] coordinates."""

    background: str
    objects: tuple[tuple[str, str, float, float], ...]

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {(color, shape) for color, shape, _, _ in self.objects}


def _as_array(image) -> np.ndarray:
    """PIL image or `[H, W, 3]` / `[3, H, W]` array (uint8 or float in [0, 1]) -> float32 `[JUDGE_SIZE, JUDGE_SIZE, 3]`
    in 0…255."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
            raise ValueError(f"image must be a PIL image or an RGB array [H, W, 3] / [3, H, W], got {array.shape}")
        if array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        pil = Image.fromarray(array)
    if pil.size != (JUDGE_SIZE, JUDGE_SIZE):
        pil = pil.resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BOX)
    return np.asarray(pil, dtype=np.float32)


def _features(mask: np.ndarray) -> tuple[float, float]:
    """(fill ratio of the bounding box, solidity) of a boolean component mask."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    box = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    # hull over the pixel squares' corners, so that area and hull measure the same thing
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    try:
        hull = ConvexHull(corners).volume  # in 2-D, `volume` is the area
    except QhullError:  # degenerate (a line of pixels)
        hull = box
    return area / box, min(1.0, area / max(hull, 1.0))


@functools.cache
def shape_prototypes() -> dict[str, tuple[float, float]]:
    """Mean (fill, solidity) of every shape class over ground-truth renders at the world's sizes (measured once)."""
    rng = random.Random("judge-prototypes")
    features: dict[str, list[tuple[float, float]]] = {kind: [] for kind in SHAPES}
    for kind in SHAPES:
        for radius in (27.0, 32.0, 38.0, 45.0, 52.0):
            shape = Shape(kind, "red", 120 + rng.uniform(-20, 20), 120 + rng.uniform(-20, 20), radius)
            pixels = _as_array(render(Scene("white", (shape,))))
            mask = _nearest_colors(pixels, 80.0) == _PALETTE_NAMES.index("red")
            features[kind].append(_features(_largest_component(mask)))
    return {kind: tuple(np.mean(values, axis=0).tolist()) for kind, values in features.items()}


def _nearest_colors(pixels: np.ndarray, max_distance: float) -> np.ndarray:
    """`[H, W]` index of the nearest palette colour, -1 where none is within `max_distance`."""
    distance = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)
    nearest = distance.argmin(-1)
    nearest[distance.min(-1) > max_distance] = -1
    return nearest


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def judge(image, max_color_distance: float = 80.0, min_area: int = 40) -> Judgement:
    """Judge one image (PIL or RGB array of any size): background colour and the objects on it."""
    pixels = _as_array(image)
    nearest = _nearest_colors(pixels, max_color_distance)
    counts = np.bincount(nearest[nearest >= 0], minlength=len(_PALETTE_NAMES))
    background = int(counts.argmax())
    prototypes = shape_prototypes()
    objects = []
    for index, name in enumerate(_PALETTE_NAMES):
        if index == background or counts[index] < min_area:
            continue
        component = _largest_component(nearest == index)
        if component.sum() < min_area:
            continue
        fill, solidity = _features(component)
        kind = min(prototypes, key=lambda k: (fill - prototypes[k][0]) ** 2 + (solidity - prototypes[k][1]) ** 2)
        ys, xs = np.nonzero(component)
        objects.append((name, kind, float(xs.mean() + 0.5) / JUDGE_SIZE, float(ys.mean() + 0.5) / JUDGE_SIZE))
    return Judgement(_PALETTE_NAMES[background], tuple(objects))


@dataclass(frozen=True)
class SceneScore:
    """Per-prompt verdicts. `adherence`: right background and every prompted (colour, shape) present."""

    background: bool
    colors: bool  # background right and every prompted colour present (any shape)
    shapes: bool  # every prompted colour's largest region has the prompted shape (background ignored)
    adherence: bool
    relation: bool | None  # two-shape prompts: the two objects are in the prompted order (None otherwise)


def judge_scene(judgement: Judgement, scene: Scene) -> SceneScore:
    """Compare a judgement with the scene a prompt describes."""
    background = judgement.background == scene.background
    found_colors = {color for color, _, _, _ in judgement.objects}
    colors = background and all(shape.color in found_colors for shape in scene.shapes)
    shapes = all((s.color, s.kind) in judgement.pairs for s in scene.shapes)
    adherence = background and shapes
    relation = None
    if scene.relation is not None and len(scene.shapes) == 2:
        where = {color: (x, y) for color, _, x, y in judgement.objects}
        first, second = (where.get(s.color) for s in scene.shapes)
        if first is None or second is None:
            relation = False
        else:
            axis, sign = {"above": (1, -1), "below": (1, 1), "left of": (0, -1), "right of": (0, 1)}[scene.relation]
            relation = sign * (first[axis] - second[axis]) > 0
    return SceneScore(background, colors, shapes, adherence, relation)


__all__ = ["JUDGE_SIZE", "Judgement", "SceneScore", "judge", "judge_scene", "shape_prototypes"]
