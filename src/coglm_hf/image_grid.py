"""Labelled picture grids (the CLI's `--grid`, the demo evaluation's pictures): PIL only, no torch."""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

LINE_SPACING = 1.25
GAP = 4  # pixels between cells, so that images with white borders stay apart
CANVAS = (225, 225, 225)


def grid_columns(count: int) -> int:
    """Columns of a square-ish grid of `count` cells (4 → 2×2, 5 → 3+2, 10 → 4+4+2)."""
    if count < 1:
        raise ValueError(f"a grid needs at least one image, got {count}")
    return math.ceil(math.sqrt(count))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels; the last line ends with "…" when text is left over."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and draw.textlength(trial, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    lines.append(current)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "…"]
    return lines


def make_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    labels: Sequence[Sequence[str]] | None = None,
    column_titles: Sequence[str] | None = None,
    cell: int | None = None,
    max_label_lines: int = 3,
) -> Image.Image:
    """Tile `rows` of images on a light grey canvas, `GAP` pixels apart, each with its caption underneath, titles
    above the columns.

    Args:
        rows: images row by row (`None` leaves a cell empty); resized to `cell`×`cell` (box filter) when `cell` is
            given, else all must have the first image's size.
        labels: one caption per image, same shape as `rows` (wrapped to the cell width, at most `max_label_lines`).
        column_titles: one title per column, drawn above the first row.
        cell: side of a cell in pixels (default: the images' own size).

    Returns:
        the grid, `RGB`.
    """
    first = next((image for row in rows for image in row if image is not None), None)
    if first is None:
        raise ValueError("a grid needs at least one image")
    width, height = (cell, cell) if cell else first.size
    columns = max(len(row) for row in rows)
    font_size = max(10, min(width // 14, 20))
    font = _font(font_size)
    line = math.ceil(font_size * LINE_SPACING)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [[_wrap(measure, text, font, width - 4, max_label_lines) for text in row] for row in labels or []]
    caption = line * max((len(lines) for row in wrapped for lines in row), default=0)
    caption += 4 if caption else 0
    titles = [_wrap(measure, text, font, width - 4, 2) for text in column_titles or []]
    top = line * max((len(lines) for lines in titles), default=0)
    top += 4 if top else 0
    step_x, step_y = width + GAP, height + caption + GAP
    grid = Image.new("RGB", (columns * step_x - GAP, top + len(rows) * step_y - GAP), CANVAS)
    draw = ImageDraw.Draw(grid)
    for c, lines in enumerate(titles):
        for k, text in enumerate(lines):
            draw.text((c * step_x + 2, 2 + k * line), text, fill="black", font=font)
    for r, row in enumerate(rows):
        y = top + r * step_y
        for c, image in enumerate(row):
            if image is None:
                continue
            if image.size != (width, height):
                if not cell:
                    raise ValueError(f"images of a grid must share one size (or pass cell=): {image.size} vs "
                                     f"{(width, height)}")
                image = image.resize((width, height), Image.Resampling.BOX)
            grid.paste(image.convert("RGB"), (c * step_x, y))
            for k, text in enumerate(wrapped[r][c] if labels else []):
                draw.text((c * step_x + 2, y + height + 2 + k * line), text, fill="black", font=font)
    return grid
