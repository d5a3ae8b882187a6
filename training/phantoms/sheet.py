"""A contact sheet: one captioned phantom per finding plus a normal one, all of the same chest.

Each caption names the finding and prints its measured signature beside the normal chest's value, so
the picture shows both what the finding looks like and that the measurement sees it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.labels import LABELS, NO_FINDING, NUM_LABELS
from training.phantoms.measure import MEASUREMENTS, MeasurementView
from training.phantoms.render import check_size, make_scene, render_scene

COLUMNS = 5


def contact_sheet(size: int = 256, seed: int = 0) -> Image.Image:
    """The sheet as a PIL image: 15 tiles (normal + 14 findings) in 3 rows of 5."""
    size = check_size(size)
    scene = make_scene(seed)
    normal = render_scene(scene, np.zeros(NUM_LABELS, dtype=bool), size)
    normal_view = MeasurementView(normal, scene)
    tiles = [(normal, NO_FINDING, "")]
    for index, finding in enumerate(LABELS):
        present = np.zeros(NUM_LABELS, dtype=bool)
        present[index] = True
        image = render_scene(scene, present, size)
        measurement = MEASUREMENTS[finding]
        value = measurement.read(MeasurementView(image, scene))
        tiles.append(
            (image, finding, f"{measurement.short} {value:.2f} (normal {measurement.read(normal_view):.2f})")
        )

    font_size = max(9, size // 16)
    caption_height = int(2.6 * font_size) + 6
    title_font = ImageFont.load_default(size=font_size)
    detail_font = ImageFont.load_default(size=max(8, int(font_size * 0.8)))
    rows = -(-len(tiles) // COLUMNS)
    sheet = Image.new("L", (COLUMNS * size, rows * (size + caption_height)), color=0)
    draw = ImageDraw.Draw(sheet)
    for k, (image, title, detail) in enumerate(tiles):
        x, y = (k % COLUMNS) * size, (k // COLUMNS) * (size + caption_height)
        sheet.paste(Image.fromarray(np.round(image * 255).astype(np.uint8)), (x, y))
        draw.text((x + 4, y + size + 3), title, fill=255, font=title_font)
        draw.text((x + 4, y + size + 5 + font_size), detail, fill=190, font=detail_font)
    return sheet


def write_contact_sheet(path: str | Path, size: int = 256, seed: int = 0) -> Path:
    """Write the contact sheet PNG to ``path`` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    contact_sheet(size, seed).save(buffer, format="PNG", optimize=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path
