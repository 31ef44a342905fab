"""The "shapes" world: a procedural, seeded text-image dataset for the embedded demo model.

A scene is one to three flat shapes (circle, square, triangle, star) of distinct colours on a plain background
of another colour, centred on a 24 px lattice (one stage-1 token) with sizes from one short list. Scenes are drawn
at `HIRES_SIZE` (240 px) and box-filtered to `LOWRES_SIZE` (80 px), so the
low-res image is exactly what the super-resolution stages see as their input. Every scene has an English and a
Chinese caption from templates.

The split is by content: a scene's *key* is its background and its (colour, shape) set, ignoring sizes,
positions and wording. About one key in eight is held out (`is_held_out`); training samples never show a
held-out key, so "a yellow circle on a black background" (held out) is an unseen combination of seen words.

Everything is a pure function of `(seed, index)`: `ShapesDataset(seed)[i]` is the same scene on every machine.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HIRES_SIZE = 240
LOWRES_SIZE = 80

# RGB values far apart from each other, so that colour segmentation of blurry decoded images stays easy
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 40, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "white": "白色",
             "black": "黑色"}
SHAPES = ("circle", "square", "triangle", "star")
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形"}
RELATIONS = ("above", "below", "left of", "right of")
RELATION_WORDS = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
RELATIONS_ZH = {"above": "上方", "below": "下方", "left of": "左边", "right of": "右边"}
HELD_OUT_MODULUS = 8
# A lone shape has one of the sizes that shapes also have in two- and three-shape scenes: with local image tokens,
# a held-out one-shape scene ("a red star on a green background") is then made of object tokens that training
# showed in other scenes (a red star beside another shape on green), not of tokens never seen.
SINGLE_RADII = (36.0, 48.0)  # the two sizes of a lone shape ("small", "large")
PAIR_RADII = (36.0, 48.0)  # sizes of the shapes of two-shape scenes
TRIPLE_RADIUS = 36.0
LATTICE = 24.0  # centres lie on this grid of the 240 px canvas (one 8 px token of the 80 px image)
PAIR_AXIS = (48.0, 192.0)  # centres of two-shape scenes along the axis of their relation (low, high)


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour name, centre (x, y) and radius in pixels of the `HIRES_SIZE` canvas."""

    kind: str
    color: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """A background colour and one to three shapes; `relation` links shapes[0] to shapes[1] in two-shape scenes."""

    background: str
    shapes: tuple[Shape, ...]
    relation: str | None = None

    @property
    def key(self) -> str:
        """Content key of the split: background + sorted (colour, shape) pairs (no size, position or wording)."""
        return scene_key(self.background, [(s.color, s.kind) for s in self.shapes])


def scene_key(background: str, objects: list[tuple[str, str]]) -> str:
    return background + "|" + ",".join(sorted(f"{color} {kind}" for color, kind in objects))


def is_held_out(key: str) -> bool:
    """True for the ~1/8 of content keys reserved for evaluation (stable hash, independent of Python's)."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def _shape_polygon(shape: Shape, scale: float) -> list[tuple[float, float]]:
    x, y, r = shape.x * scale, shape.y * scale, shape.radius * scale
    if shape.kind == "square":
        h = r * 0.85  # a square looks as big as a circle of radius r when its half-side is ~0.85 r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape.kind == "triangle":  # equilateral, apex up, centred on its bounding box
        h = r * 0.95
        return [(x, y - h), (x + h, y + h * 0.8), (x - h, y + h * 0.8)]
    if shape.kind == "star":  # five points, inner radius 0.45 r
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle) + r * 0.1))
        return points
    raise ValueError(f"unknown shape kind {shape.kind!r}; use one of {SHAPES}")


def render(scene: Scene, size: int = HIRES_SIZE) -> Image.Image:
    """Draw `scene` as an RGB image of `size`×`size` (drawn at 240 px or more, then box-filtered down)."""
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    canvas = max(size, HIRES_SIZE)
    scale = canvas / HIRES_SIZE
    image = Image.new("RGB", (canvas, canvas), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        if shape.kind == "circle":
            x, y, r = shape.x * scale, shape.y * scale, shape.radius * scale
            draw.ellipse([x - r, y - r, x + r, y + r], fill=COLORS[shape.color])
        else:
            draw.polygon(_shape_polygon(shape, scale), fill=COLORS[shape.color])
    return image if canvas == size else image.resize((size, size), Image.Resampling.BOX)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(shape: Shape, with_size: bool) -> str:
    size = ("small " if shape.radius < SINGLE_RADII[1] else "large ") if with_size else ""
    words = f"{size}{shape.color} {shape.kind}"
    return f"{_article(words)} {words}"


def caption_en(scene: Scene, rng: random.Random | None = None) -> str:
    """English caption of `scene` from templates; `rng` picks among equivalent wordings (first one if None)."""
    pick = rng.random() if rng is not None else 0.0
    bg = scene.background
    parts = [_phrase(s, with_size=len(scene.shapes) == 1 and pick > 0.5) for s in scene.shapes]
    if len(scene.shapes) == 1:
        body = parts[0]
    elif len(scene.shapes) == 2:
        body = f"{parts[0]} {RELATION_WORDS[scene.relation]} {parts[1]}"
    else:
        body = f"{parts[0]}, {parts[1]} and {parts[2]}"
    if pick < 0.75:
        return f"{body} on {_article(bg)} {bg} background"
    return f"{_article(bg)} {bg} background with {body}"


def caption_zh(scene: Scene, rng: random.Random | None = None) -> str:
    """Chinese caption of `scene` from templates ("蓝色背景上的红色圆形")."""
    pick = rng.random() if rng is not None else 0.0
    bg = COLORS_ZH[scene.background] + "背景"
    names = [COLORS_ZH[s.color] + SHAPES_ZH[s.kind] for s in scene.shapes]
    if len(names) == 1:
        return f"{bg}上的{names[0]}" if pick < 0.6 else f"{bg}上有一个{names[0]}"
    if len(names) == 2:
        return f"{bg}上，{names[0]}在{names[1]}的{RELATIONS_ZH[scene.relation]}"
    return f"{bg}上的{names[0]}、{names[1]}和{names[2]}"


def lattice_offset(rng: random.Random) -> float:
    """A random step of -1, 0 or +1 lattice cells: where a shape sits around its nominal centre."""
    return LATTICE * rng.choice((-1, 0, 1))


def _place(num_shapes: int, relation: str | None, rng: random.Random) -> list[tuple[float, float, float]]:
    """Centres and radii (240 px canvas) that do not overlap and respect the relation of two-shape scenes.

    Centres lie on the `LATTICE` (24 px: one stage-1 token of the 80 px image), so one object always covers the same
    token patches, and sizes come from short lists: the image tokens of a scene are a function of its content.
    """
    if num_shapes == 1:
        radius = rng.choice(SINGLE_RADII)
        return [(120 + lattice_offset(rng), 120 + lattice_offset(rng), radius)]
    if num_shapes == 2:
        radius = [rng.choice(PAIR_RADII), rng.choice(PAIR_RADII)]
        near, far = lattice_offset(rng), lattice_offset(rng)
        first_is_low = relation in ("above", "left of")
        u0, u1 = PAIR_AXIS if first_is_low else PAIR_AXIS[::-1]  # first / second coordinate on the axis
        if relation in ("above", "below"):
            return [(120 + near, u0, radius[0]), (120 + far, u1, radius[1])]
        return [(u0, 120 + near, radius[0]), (u1, 120 + far, radius[1])]
    # three shapes: three of the four quadrants, shuffled
    quadrants = [(72.0, 72.0), (168.0, 72.0), (72.0, 168.0), (168.0, 168.0)]
    rng.shuffle(quadrants)
    return [(qx, qy, TRIPLE_RADIUS) for qx, qy in quadrants[:3]]


def random_scene(rng: random.Random, num_shapes: int | None = None) -> Scene:
    """A scene drawn from the world's distribution: 1 shape 45 %, 2 shapes 40 %, 3 shapes 15 %."""
    if num_shapes is None:
        num_shapes = rng.choices((1, 2, 3), weights=(45, 40, 15))[0]
    if num_shapes not in (1, 2, 3):
        raise ValueError(f"num_shapes must be 1, 2 or 3, got {num_shapes!r}")
    names = list(COLORS)
    background = rng.choice(names)
    colors = rng.sample([c for c in names if c != background], num_shapes)
    kinds = [rng.choice(SHAPES) for _ in range(num_shapes)]
    relation = rng.choice(RELATIONS) if num_shapes == 2 else None
    places = _place(num_shapes, relation, rng)
    shapes = tuple(Shape(kind, color, x, y, r) for kind, color, (x, y, r) in zip(kinds, colors, places))
    return Scene(background, shapes, relation)


@dataclass(frozen=True)
class ShapesSample:
    scene: Scene
    caption_en: str
    caption_zh: str

    def image(self, size: int = HIRES_SIZE) -> Image.Image:
        return render(self.scene, size)


class ShapesDataset:
    """Endless seeded stream of the shapes world, indexable: `dataset[i]` depends only on `(seed, i)`.

    Args:
        seed: dataset seed.
        split: "train" (held-out keys are skipped) or "heldout" (only held-out keys) or "all".
        length: nominal length (`len()`, iteration); indexing works for any non-negative index.
    """

    def __init__(self, seed: int = 0, split: str = "train", length: int = 10000):
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        if not isinstance(length, int) or length <= 0:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.seed, self.split, self.length = seed, split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> ShapesSample:
        if not isinstance(index, int) or index < 0:
            raise IndexError(f"index must be a non-negative int, got {index!r}")
        rng = random.Random(f"shapes/{self.seed}/{index}")
        while True:  # rejection sampling keeps the draw a pure function of (seed, index)
            scene = random_scene(rng)
            held = is_held_out(scene.key)
            if self.split == "all" or held == (self.split == "heldout"):
                return ShapesSample(scene, caption_en(scene, rng), caption_zh(scene, rng))

    def __iter__(self):
        return (self[i] for i in range(self.length))


def heldout_prompts(num_prompts: int = 24, seed: int = 1234) -> list[ShapesSample]:
    """Distinct held-out scenes of one and two shapes (the evaluation prompts), in a fixed order."""
    if not isinstance(num_prompts, int) or num_prompts <= 0:
        raise ValueError(f"num_prompts must be a positive int, got {num_prompts!r}")
    samples, keys = [], set()
    dataset = ShapesDataset(seed, split="heldout")
    index = 0
    while len(samples) < num_prompts:
        sample = dataset[index]
        index += 1
        if len(sample.scene.shapes) <= 2 and sample.scene.key not in keys:
            keys.add(sample.scene.key)
            samples.append(sample)
        if index > 100 * num_prompts:
            raise ValueError(f"could not find {num_prompts} distinct held-out prompts; ask for fewer")
    return samples


def single_object_prompts(per_shape: int = 6) -> list[ShapesSample]:
    """`per_shape` held-out one-shape prompts of every kind ("a red star on a green background"), kinds in the order of
    `SHAPES`, for the shape-accuracy evaluation.

    Every held-out (background, colour, kind) key of a kind is used in a fixed order, cycling when a kind has fewer
    keys than `per_shape` (the world holds out 3 circle keys and 5 star keys). The scenes are centred and alternate
    between the two single-shape sizes, so that the reference rows (renders, VQ round trips) see both.
    """
    if not isinstance(per_shape, int) or per_shape <= 0:
        raise ValueError(f"per_shape must be a positive int, got {per_shape!r}")
    samples = []
    for kind in SHAPES:
        keys = [(background, color) for background in COLORS for color in COLORS
                if color != background and is_held_out(scene_key(background, [(color, kind)]))]
        for i in range(per_shape):
            background, color = keys[i % len(keys)]
            scene = Scene(background, (Shape(kind, color, 120.0, 120.0, SINGLE_RADII[i % 2]),))
            samples.append(ShapesSample(scene, caption_en(scene), caption_zh(scene)))
    return samples


def export_image_folder(folder: str | Path, count: int, seed: int = 0, split: str = "train") -> list[Path]:
    """Write `count` scenes as an image folder for `coglm_hf.training` (`image_folder_records`): `shapes-NNNNNN.png`
    (240 px) with its English caption in `shapes-NNNNNN.txt` and its Chinese caption in `shapes-NNNNNN.zh.txt`.

    Returns:
        the PNG paths, in order.
    """
    dataset = ShapesDataset(seed, split=split, length=count)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, sample in enumerate(dataset):
        stem = folder / f"shapes-{index:06d}"
        sample.image().save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(sample.caption_en + "\n", encoding="utf-8")
        stem.with_suffix(".zh.txt").write_text(sample.caption_zh + "\n", encoding="utf-8")
        paths.append(stem.with_suffix(".png"))
    return paths


def image_to_array(image: Image.Image) -> np.ndarray:
    """PIL RGB -> float32 `[3, H, W]` in [0, 1]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


__all__ = [
    "COLORS",
    "HIRES_SIZE",
    "LATTICE",
    "LOWRES_SIZE",
    "PAIR_AXIS",
    "PAIR_RADII",
    "SHAPES",
    "SINGLE_RADII",
    "TRIPLE_RADIUS",
    "Scene",
    "Shape",
    "ShapesDataset",
    "ShapesSample",
    "caption_en",
    "export_image_folder",
    "caption_zh",
    "heldout_prompts",
    "image_to_array",
    "is_held_out",
    "lattice_offset",
    "random_scene",
    "render",
    "scene_key",
    "single_object_prompts",
]


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coglm_hf.demo.shapes",
                                     description="Write scenes of the shapes world as a captioned image folder.")
    parser.add_argument("--export", required=True, metavar="DIR", help="folder to write (x.png, x.txt, x.zh.txt)")
    parser.add_argument("--count", type=int, default=64, help="scenes to write (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                        help="training scenes (default), held-out ones, or both")
    args = parser.parse_args(argv)
    paths = export_image_folder(args.export, args.count, args.seed, args.split)
    print(f"wrote {len(paths)} scenes to {args.export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
