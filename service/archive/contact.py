"""A captioned contact sheet of an archive: one row per label set, the first images of each.

    python -m service.archive contact --dest s3://bucket/prefix --out archive-sheet.png

Reads the chunk manifests in order (a partial archive works too) until every row is full or
``scan`` records were read, then fetches only the images shown, in the format each record names (PNG
or DICOM), shown as 8-bit grey levels. A pairs job's sheet shows pairs instead: one row per reference,
then each finding's counterfactual and difference map, captioned with the finding's probability by
the LCO classifier (and the auditor) before and after.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from service.archive.manifest import JOB_KEY, decode_records, is_dropped
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


def _pair_caption(pair: dict) -> str:
    """Two lines: the finding added, then its probability before -> after (LCO classifier, auditor)."""
    audited = (f" aud {pair['auditor_probability_before']:.2f}>{pair['auditor_probability_after']:.2f}"
               if "auditor_probability_after" in pair else "")
    return f"+ {pair['finding']}\nclf {pair['lco_probability_before']:.2f}>{pair['lco_probability_after']:.2f}{audited}"


def _pair_rows(sink: Sink, rows: int) -> list[tuple[str, list[tuple[Image.Image, str]]]]:
    """The first ``rows`` references with a kept pair: reference, then counterfactual and difference per pair."""
    sheet_rows = []
    for key in sink.list("manifests/"):
        for record in decode_records(sink.get(key), sink.uri(key)):
            kept = [pair for pair in record.get("pairs", []) if not is_dropped(pair)]
            if is_dropped(record) or not kept:
                continue
            tiles = [(_tile(sink, record), record["finding_labels"][:20])]
            for pair in kept:
                tiles.append((_tile(sink, pair), _pair_caption(pair)))
                if "difference" in pair:
                    tiles.append((Image.open(io.BytesIO(sink.get(pair["difference"]))),
                                  f"±{pair['difference_scale']:.2f}"))
            sheet_rows.append((record["id"], tiles))
            if len(sheet_rows) == rows:
                return sheet_rows
    return sheet_rows


def write_contact_sheet(sink: Sink, out: Path, per_row: int = 8, rows: int = 16, scan: int = 20_000) -> Path:
    """Write the sheet to ``out`` (PNG); rows are the most frequent label sets among scanned records, or
    in a pairs job the first references with their pairs."""
    from service.demo import contact_sheet

    if "pairs" in json.loads(sink.get(JOB_KEY))["spec"]:
        pair_rows = _pair_rows(sink, rows)
        if not pair_rows:
            raise ValueError(f"{sink.uri()} has no pair records yet; run a shard first")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(pair_rows, out)
        return out
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
