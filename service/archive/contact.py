"""A captioned contact sheet of an archive: one row per label set, the first images of each.

    python -m service.archive contact --dest s3://bucket/prefix --out archive-sheet.png

Reads the chunk manifests in order (a partial archive works too) until every row is full or
``scan`` records were read, then fetches only the images shown, in the format each record names (PNG
or DICOM), shown as 8-bit grey levels.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from service.archive.manifest import decode_records, is_dropped
from service.image_formats import decode_image
from service.labels import LABELS, NO_FINDING, parse_finding_labels
from service.png import to_pixels
from service.sinks import Sink


def _tile_caption(record: dict) -> str:
    positives = [LABELS[i] for i, v in enumerate(parse_finding_labels(record["finding_labels"])) if v]
    probabilities = record["probabilities"]
    shown = min(probabilities[name] for name in positives) if positives else max(probabilities.values())
    mark = "ok" if record["satisfied"] else "unsat"
    return f"{'p' if positives else 'max p'}={shown:.2f} {mark}"


def _tile(sink: Sink, record: dict) -> Image.Image:
    """The record's image as an 8-bit grey tile (16-bit PNG and DICOM included)."""
    return Image.fromarray(to_pixels(decode_image(sink.get(record["image"]), record["format"]), "png8"))


def write_contact_sheet(sink: Sink, out: Path, per_row: int = 8, rows: int = 16, scan: int = 20_000) -> Path:
    """Write the sheet to ``out`` (PNG); rows are the most frequent label sets among scanned records."""
    from service.demo import contact_sheet

    groups: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    seen = 0
    for key in sink.list("manifests/"):
        for record in decode_records(sink.get(key), sink.uri(key)):
            if is_dropped(record):
                continue  # no image: the auditor rejected it through every retry
            label_set = record["finding_labels"]
            counts[label_set] = counts.get(label_set, 0) + 1
            if len(groups.setdefault(label_set, [])) < per_row:
                groups[label_set].append(record)
            seen += 1
        if seen >= scan:
            break
    if not groups:
        raise ValueError(f"{sink.uri()} has no manifest records yet; run a shard first")
    ordered = sorted(groups, key=lambda label_set: (label_set != NO_FINDING, -counts[label_set], label_set))[:rows]
    sheet_rows = []
    for label_set in ordered:
        tiles = [(_tile(sink, r), _tile_caption(r)) for r in groups[label_set]]
        caption = label_set.replace("|", " + ")
        sheet_rows.append((f"{caption[:22]} ({100 * counts[label_set] / seen:.1f}%)", tiles))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(sheet_rows, out)
    return out
