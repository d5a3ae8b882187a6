"""Where findings sit on real films: a table of the NIH ChestX-ray14 bounding boxes, normalised.

``derive_bbox_table`` turns the real ``BBox_List_2017.csv`` (984 boxes on 1024² images, 8 findings)
into box centres and sizes as fractions of the image, grouped by finding; the result ships as
``data/nih_bbox_placement.json`` and the phantoms draw finding positions from it.
"""

from __future__ import annotations

import csv
import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from service.labels import parse_label

NIH_IMAGE_SIZE = 1024.0
TABLE_RESOURCE = "data/nih_bbox_placement.json"
DECIMALS = 4
# The average NIH film, in image fractions: lung fields span this box. Boxes are mapped from it onto
# each phantom's own thorax.
NIH_THORAX = {"half_width": 0.36, "apex_v": 0.12, "base_v": 0.74}


def derive_bbox_table(csv_path: str | Path) -> dict:
    """Box centres and sizes per finding, as image fractions, from the NIH bounding-box CSV."""
    opener = gzip.open if str(csv_path).endswith(".gz") else open
    boxes: dict[str, list[list[float]]] = {}
    with opener(csv_path, "rt", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if header[:2] != ["Image Index", "Finding Label"]:
            raise ValueError(f"{csv_path}: expected the NIH BBox_List_2017 header, got {header[:3]}")
        for row in reader:
            x, y, w, h = (float(value) / NIH_IMAGE_SIZE for value in row[2:6])
            box = [
                round(x + w / 2, DECIMALS),
                round(y + h / 2, DECIMALS),
                round(w, DECIMALS),
                round(h, DECIMALS),
            ]
            boxes.setdefault(parse_label(row[1]), []).append(box)
    return {
        "source": "NIH ChestX-ray14 BBox_List_2017.csv (1024x1024 images)",
        "columns": ["center_u", "center_v", "width", "height"],
        "findings": {name: boxes[name] for name in sorted(boxes)},
    }


@lru_cache(maxsize=1)
def bbox_table() -> dict[str, np.ndarray]:
    """The shipped table: finding name -> [N, 4] (centre u, centre v, width, height)."""
    table = json.loads(resources.files("training.phantoms").joinpath(TABLE_RESOURCE).read_text())
    return {name: np.asarray(rows, dtype=np.float64) for name, rows in table["findings"].items()}


def write_bbox_table(csv_path: str | Path, out_path: str | Path) -> None:
    out_path = Path(out_path)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(derive_bbox_table(csv_path), separators=(",", ":")) + "\n")
    tmp.replace(out_path)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m training.phantoms.placement BBox_List_2017.csv.gz OUT.json")
    write_bbox_table(sys.argv[1], sys.argv[2])
