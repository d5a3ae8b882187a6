"""Derive the shipped NIH label prior from the real ChestX-ray14 Data_Entry table.

The prior is the exact table of label combinations and their counts, so sampling from it reproduces
both the marginal prevalences and the co-occurrences of the real data set.

    python scripts/compute_nih_prior.py ../shared/data/nih/Data_Entry_2017_v2020.csv.gz
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
from collections import Counter
from pathlib import Path

from service.labels import format_finding_labels, parse_finding_labels

OUTPUT = Path(__file__).resolve().parents[1] / "service" / "data" / "nih_label_prior.json"


def compute(csv_path: Path) -> dict:
    opener = gzip.open if csv_path.suffix == ".gz" else open
    with opener(csv_path, "rt", newline="") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    combos = Counter(format_finding_labels(parse_finding_labels(row["Finding Labels"])) for row in rows)
    return {
        "source": csv_path.name,
        "images": len(rows),
        "patients": len({row["Patient ID"] for row in rows}),
        "combinations": [{"labels": key, "count": n} for key, n in combos.most_common()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="Data_Entry_2017_v2020.csv(.gz)")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    prior = compute(args.csv)
    lines = ",\n".join("  " + json.dumps(c) for c in prior["combinations"])
    header = json.dumps({k: v for k, v in prior.items() if k != "combinations"})[:-1]
    args.out.write_text(f'{header}, "combinations": [\n{lines}\n]}}\n')
    print(f"{len(prior['combinations'])} label combinations from {prior['images']} images -> {args.out}")


if __name__ == "__main__":
    main()
