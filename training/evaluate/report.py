"""The report of one evaluation run: ``report.html`` and ``report.json`` with the PNG plots beside them.

A report is a list of sections, each a title, a summary (a flat or nested dict shown as a two-column
table), optional tables (header + rows) and PNG pictures. Every part of the suite adds its own section
(distances, label distribution, fidelity, diversity, TSTR, the Fréchet distance during training, sample
grids); any other step adds one the same way (`ReportSection`: the memorisation audit's nearest-neighbour
pairs, for one). The report is built in a hidden staging folder beside the target and renamed into place
when complete, and a target that exists is refused: nothing is half-written or overwritten.
"""

from __future__ import annotations

import html
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import Self

from service.labels import LABELS, NO_FINDING
from training.evaluate.statistics import flatten


@dataclass
class ReportSection:
    """One section: `title`, `summary` (JSON-able dict), `tables` [(header, rows)], `pictures` (PNG paths),
    `note` (a sentence of text under the title)."""

    title: str
    summary: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[Sequence[str], list[Sequence[Any]]]] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)
    note: str = ""


class ReportWriter:
    """Collects sections in a staging folder; `finish` writes the HTML and JSON and renames the folder
    to `directory`. Use as a context manager: an exception removes the staging folder.

    Raises FileExistsError at once when `directory` exists.
    """

    def __init__(self, directory: str | Path, title: str):
        self.directory = Path(directory)
        if self.directory.exists():
            raise FileExistsError(f"report directory {self.directory} exists; choose a new one (reports are not "
                                  "overwritten)")
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(dir=self.directory.parent, prefix=f".{self.directory.name}.partial-"))
        self.title = title
        self.sections: list[ReportSection] = []
        self.results: dict[str, Any] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *_: object) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def picture(self, name: str, draw: Callable[[Path], Any]) -> Path:
        """A PNG drawn by `draw(path)` into the report; returns its path."""
        path = self.staging / name
        draw(path)
        return path

    def add(self, section: ReportSection, results_key: str | None = None, results: Any = None) -> None:
        """Add a section (PNGs from elsewhere are copied in) and, under `results_key`, its raw results."""
        pictures = []
        for picture in section.pictures:
            picture = Path(picture)
            if picture.parent != self.staging:
                target = self.staging / f"{len(self.sections):02d}-{picture.name}"
                shutil.copyfile(picture, target)
                picture = target
            pictures.append(picture)
        section.pictures = pictures
        self.sections.append(section)
        if results_key is not None:
            self.results[results_key] = results

    def finish(self) -> Path:
        document = {"title": self.title, "sections": [
            {"title": s.title, "note": s.note, "summary": s.summary,
             "tables": [{"header": list(h), "rows": [list(r) for r in rows]} for h, rows in s.tables],
             "pictures": [p.name for p in s.pictures]} for s in self.sections], "results": self.results}
        (self.staging / "report.json").write_text(json.dumps(_jsonable(document), indent=1, sort_keys=True,
                                                             allow_nan=False) + "\n")
        (self.staging / "report.html").write_text(self._html())
        self.staging.rename(self.directory)
        return self.directory / "report.html"

    def _html(self) -> str:
        parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(self.title)}</title>",
                 f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>", "<nav><ol>"]
        parts += [f'<li><a href="#s{i}">{html.escape(s.title)}</a></li>' for i, s in enumerate(self.sections)]
        parts.append("</ol></nav>")
        for index, section in enumerate(self.sections):
            parts.append(f'<section id="s{index}"><h2>{html.escape(section.title)}</h2>')
            if section.note:
                parts.append(f"<p>{html.escape(section.note)}</p>")
            if section.summary:
                rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_cell(v))}</td></tr>"
                               for k, v in flatten(section.summary).items())
                parts.append(f"<table class=summary>{rows}</table>")
            for header, rows in section.tables:
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
                body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>"
                               for row in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            for picture in section.pictures:
                parts.append(f'<figure><img src="{html.escape(picture.name)}" alt="{html.escape(section.title)}">'
                             "</figure>")
            parts.append("</section>")
        parts.append("</body></html>\n")
        return "\n".join(parts)


_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:0.8em 0;font-size:0.9em}"
          "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}thead th{background:#eee}"
          "table.summary th{background:#f6f6f6;font-weight:normal}img{max-width:100%}"
          "section{border-top:2px solid #ddd;margin-top:1.5em}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (Path,)):
        return str(value)
    return value


def interval_text(entry: dict[str, Any] | None, digits: int = 3, percent: bool = False) -> str:
    """'value [low, high]' of a dict with value/ci_low/ci_high (a Proportion or an Interval)."""
    if entry is None or entry.get("value") is None:
        return "—"
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    text = f"{entry['value'] * scale:.{digits}g}{suffix}"
    if entry.get("ci_low") is not None:
        text += f" [{entry['ci_low'] * scale:.{digits}g}, {entry['ci_high'] * scale:.{digits}g}]"
    return text


# -- pictures ---------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_label_prevalence(table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars per label: training prevalence, and generated prevalence by each judge, with CP CIs."""
    plt = _pyplot()
    names = [*LABELS, NO_FINDING]
    judges = [judge for judge in ("training", "lco_classifier", "auditor") if table[names[0]].get(judge)]
    width = 0.8 / len(judges)
    figure, axis = plt.subplots(figsize=(13, 4.5))
    for offset, judge in enumerate(judges):
        values = np.array([table[n][judge]["value"] for n in names])
        errors = np.array([[table[n][judge]["value"] - table[n][judge]["ci_low"],
                            table[n][judge]["ci_high"] - table[n][judge]["value"]] for n in names]).T
        trials = table[names[0]][judge]["trials"]
        axis.bar(np.arange(len(names)) + offset * width, values * 100, width, yerr=errors * 100, capsize=2,
                 label=f"{judge.replace('_', ' ')} (N = {trials})")
    axis.set_xticks(np.arange(len(names)) + width * (len(judges) - 1) / 2, names, rotation=35, ha="right", fontsize=8)
    axis.set_ylabel("prevalence (%), 95% Clopper–Pearson CI")
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_frechet_during_training(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Fréchet distance against images shown (a GAN run's metric-frechet_distance.jsonl), CI as a band."""
    plt = _pyplot()
    shown = np.array([r["images_shown"] for r in results], dtype=float) / 1000.0
    values = np.array([r["value"] for r in results], dtype=float)
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(shown, values, marker="o", ms=3)
    low = [r.get("values", {}).get("ci_low") for r in results]
    high = [r.get("values", {}).get("ci_high") for r in results]
    if all(v is not None for v in low + high):
        axis.fill_between(shown, low, high, alpha=0.25, label="95% bootstrap CI")
        axis.legend(fontsize=8)
    axis.set_xlabel("images shown (thousands)")
    axis.set_ylabel("Fréchet distance")
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_samples_beside_reals(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path, columns: int = 6) -> None:
    """One row per finding: `columns` generated images [n, S, S] (left) beside real images of that finding
    (right), in [-1, 1]."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), 2 * columns, figsize=(2 * columns * 0.9, len(rows) * 1.0 + 0.4),
                                squeeze=False)
    for row, (title, generated, real) in enumerate(rows):
        for column in range(2 * columns):
            axis = axes[row, column]
            axis.axis("off")
            source = generated if column < columns else real
            index = column if column < columns else column - columns
            if index < len(source):
                axis.imshow(source[index], cmap="gray", vmin=-1, vmax=1)
        axes[row, 0].text(-0.1, 0.5, title, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=7)
    axes[0, 0].set_title("generated (LCO)", fontsize=8, loc="left")
    axes[0, columns].set_title("real", fontsize=8, loc="left")
    figure.subplots_adjust(left=0.16, right=0.99, top=0.96, bottom=0.01, wspace=0.05, hspace=0.08)
    figure.savefig(path, dpi=80)
    plt.close(figure)
