"""Pictures of explanations: a heat map blended onto its image, a per-image figure, a contact sheet.

The colour map is matplotlib's "jet" (blue: no evidence, red: the most), as in most Grad-CAM
figures; the per-image figure is drawn with matplotlib, the contact sheet with Pillow alone (a
folder of hundreds of images would make a slow matplotlib figure).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hsqformer.data.images import to_rgb8
from hsqformer.errors import HSQformerError
from hsqformer.explain import Explanation
from hsqformer.files import atomic_path

COLORMAP = "jet"
METHOD_LABELS = {
    "gradcam": "Grad-CAM",
    "gradcam++": "Grad-CAM++",
    "hirescam": "HiResCAM",
    "attention": "query cross-attention",
}
TILE = 200  # contact sheet: the longer side of each thumbnail, in pixels
SHEET_COLUMNS = 6
SHEET_PAGE = 48  # images per contact sheet page


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """A (H, W) map in [0, 1] as (H, W, 3) uint8 colours of ``COLORMAP``."""
    import matplotlib

    colours = matplotlib.colormaps[COLORMAP](np.clip(heatmap, 0.0, 1.0))[..., :3]
    return np.round(colours * 255).astype(np.uint8)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """``image`` (any mode) with ``heatmap`` (H, W in [0, 1], the image's size) blended in at ``alpha``: RGB."""
    rgb = to_rgb8(image)
    heatmap = np.asarray(heatmap)
    if heatmap.shape != (rgb.height, rgb.width):
        raise HSQformerError(
            f"heatmap of shape {heatmap.shape} does not fit an image of {rgb.width}x{rgb.height} (needs "
            f"({rgb.height}, {rgb.width}))"
        )
    if not 0.0 <= alpha <= 1.0:
        raise HSQformerError(f"alpha must be in [0, 1], got {alpha}")
    blend = (1.0 - alpha) * np.asarray(rgb, dtype=np.float32) + alpha * colorize(heatmap).astype(np.float32)
    return Image.fromarray(np.round(blend).astype(np.uint8), mode="RGB")


def title(explanation: Explanation, positive_class: str) -> str:
    """"name.png: P(malignant) = 0.873, Grad-CAM (projector stage 4)" (the file name without its folder)."""
    label = METHOD_LABELS.get(explanation.method, explanation.method)
    on = f" ({explanation.target})" if explanation.target else ""
    name = f"{Path(explanation.image).name}: " if explanation.image else ""
    return f"{name}P({positive_class}) = {explanation.probability:.3f}, {label}{on}"


def save_figure(
    image: Image.Image, explanation: Explanation, path: Path, positive_class: str = "positive", alpha: float = 0.45
) -> Path:
    """A PNG of image | heat map | blend with ``title`` above; attention adds one blend per query stage."""
    from hsqformer.evaluation.figures import pyplot, save_png

    plt = pyplot()
    parts = list(explanation.parts.items())
    rows = 2 if parts else 1
    columns = max(3, len(parts))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.3 * rows + 0.4), squeeze=False)
    panels = [
        (np.asarray(to_rgb8(image)), "image", None),
        (explanation.heatmap, "heat map" + _spread(explanation, "heatmap"), COLORMAP),
        (np.asarray(overlay(image, explanation.heatmap, alpha)), "blend", None),
    ]
    panels += [(None, None, None)] * (columns - 3)
    panels += [
        (np.asarray(overlay(image, part, alpha)), name + _spread(explanation, name), None) for name, part in parts
    ]
    for ax, (picture, caption, cmap) in zip(axes.flat, panels):
        ax.axis("off")
        if picture is None:
            continue
        ax.imshow(picture, cmap=cmap, vmin=0.0 if cmap else None, vmax=1.0 if cmap else None)
        ax.set_title(caption, fontsize=9)
    fig.suptitle(title(explanation, positive_class), fontsize=10)
    return save_png(fig, path)


def _spread(explanation: Explanation, key: str) -> str:
    """" (density 0.97–1.03 × uniform)" for an attention map: a stretched near-uniform map is not over-read."""
    if key not in explanation.density_range:
        return ""
    low, high = explanation.density_range[key]
    return f" (density {low:.2f}–{high:.2f} × uniform)"


def thumbnail(picture: Image.Image) -> Image.Image:
    """``picture`` scaled so that its longer side is ``TILE`` pixels."""
    scale = TILE / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    return picture.resize(size, Image.Resampling.BILINEAR)


def contact_sheet(tiles: Sequence[tuple[Image.Image, str]], path: Path) -> Path:
    """One PNG of thumbnails (picture, caption) in a grid of ``SHEET_COLUMNS``, each caption under its picture."""
    if not tiles:
        raise ValueError("a contact sheet needs at least one picture")
    font = ImageFont.load_default(size=11)
    line = 14
    columns = min(SHEET_COLUMNS, len(tiles))
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = TILE + 8, TILE + 2 * line + 8
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (picture, caption) in enumerate(tiles):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        thumb = thumbnail(picture)
        sheet.paste(thumb, (x + (TILE - thumb.width) // 2, y + (TILE - thumb.height) // 2))
        for k, text in enumerate(_wrap(caption, draw, font, TILE)[:2]):
            draw.text((x, y + TILE + 2 + k * line), text, fill="black", font=font)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` cut into lines no wider than ``width`` pixels (characters, not words: names have no spaces)."""
    lines, current = [], ""
    for char in text:
        if current and draw.textlength(current + char, font=font) > width:
            lines.append(current)
            current = ""
        current += char
    return [*lines, current] if current else lines
