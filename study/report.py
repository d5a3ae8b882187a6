"""Exports of a study: the answers and the statistics as CSV, and an HTML report with plots."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math

import numpy as np
from sklearn.metrics import roc_curve

from study.statistics import POOLED, Reading, StudyStatistics, statistics_rows, study_statistics
from study.storage import Answer, Assignment, Reader, Study

ANSWER_COLUMNS = ("study", "reader", "position", "case", "origin", "case_finding_labels", "call", "confidence",
                  "findings", "reading_ms", "answered_at")


def answered(session, study: Study):
    """(reader, assignment, answer, case) rows of a study, by reader then position."""
    return (session.query(Reader, Assignment, Answer)
            .join(Assignment, Assignment.reader_id == Reader.id)
            .join(Answer, Answer.assignment_id == Assignment.id)
            .filter(Reader.study_id == study.id)
            .order_by(Reader.name, Assignment.position).all())


def load_readings(session, study: Study) -> list[Reading]:
    return [Reading(reader.name, assignment.case_id, assignment.case.origin, answer.call, answer.confidence,
                    assignment.case.finding_labels, answer.findings)
            for reader, assignment, answer in answered(session, study)]


def _csv(rows: list[dict[str, object]], columns: list[str] | tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def answers_csv(session, study: Study) -> str:
    rows = [{"study": study.name, "reader": reader.name, "position": assignment.position + 1,
             "case": assignment.case_id, "origin": assignment.case.origin,
             "case_finding_labels": assignment.case.finding_labels, "call": answer.call,
             "confidence": answer.confidence, "findings": "" if answer.findings is None else answer.findings,
             "reading_ms": "" if answer.reading_ms is None else answer.reading_ms,
             "answered_at": answer.answered_at.isoformat()}
            for reader, assignment, answer in answered(session, study)]
    return _csv(rows, ANSWER_COLUMNS)


def statistics_csv(stats: StudyStatistics) -> str:
    rows = statistics_rows(stats)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return _csv(rows, columns)


def _figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def plots(stats: StudyStatistics, readings: list[Reading]) -> dict[str, str]:
    """Base64 PNGs: accuracy with Clopper-Pearson intervals, ROC curves, per-finding agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    figure, axis = plt.subplots(figsize=(6, 3.2))
    names = [s.reader for s in stats.readers]
    values = np.array([s.accuracy.value for s in stats.readers])
    errors = np.array([[s.accuracy.value - s.accuracy.low, s.accuracy.high - s.accuracy.value]
                       for s in stats.readers]).T
    axis.errorbar(values, range(len(names)), xerr=errors, fmt="o", capsize=4)
    axis.axvline(0.5, color="grey", linestyle="--", label="chance")
    axis.set_yticks(range(len(names)), names)
    axis.set_xlim(0, 1)
    axis.set_xlabel("accuracy (real vs synthetic), 95% Clopper-Pearson")
    axis.legend(loc="lower right")
    images["accuracy"] = _figure_png(figure)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4.2, 4.2))
    for summary in stats.readers:
        mine = readings if summary.reader == POOLED else [r for r in readings if r.reader == summary.reader]
        truth = [r.origin == "synthetic" for r in mine]
        if math.isnan(summary.auc):
            continue
        fpr, tpr, _ = roc_curve(truth, [r.score for r in mine])
        axis.plot(fpr, tpr, marker=".", linewidth=2.5 if summary.reader == POOLED else 1.2,
                  label=f"{summary.reader} (AUC {summary.auc:.2f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--")
    axis.set_xlabel("1 - specificity (real called synthetic)")
    axis.set_ylabel("sensitivity (synthetic called synthetic)")
    axis.legend(loc="lower right", fontsize=8)
    images["roc"] = _figure_png(figure)
    plt.close(figure)

    asked = [f for f in stats.findings if f.agreement.total]
    if asked:
        figure, axis = plt.subplots(figsize=(6, 4))
        axis.barh([f"{f.finding} ({f.requested} of {f.agreement.total} requested)" for f in asked],
                  [f.agreement.value for f in asked])
        axis.set_xlim(0, 1)
        axis.set_xlabel("agreement of marked findings with the requested labels (synthetic images)")
        images["findings"] = _figure_png(figure)
        plt.close(figure)
    return images


def _number(value: float, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _interval(p) -> str:
    if not p.total:
        return "–"
    return f"{p.count}/{p.total} = {p.value:.3f} [{p.low:.3f}, {p.high:.3f}]"


def report_html(study: Study, readings: list[Reading], note: str = "") -> str:
    """A self-contained HTML page: set-up, per-reader table, kappas, per-finding table, plots."""
    stats = study_statistics(readings)
    images = plots(stats, readings) if readings else {}
    e = html.escape
    reader_rows = "".join(
        f"<tr><td>{e(s.reader)}</td><td>{_interval(s.accuracy)}</td><td>{_number(s.p_value, 4)}</td>"
        f"<td>{_interval(s.sensitivity)}</td><td>{_interval(s.specificity)}</td><td>{_number(s.auc)}</td></tr>"
        for s in stats.readers)
    kappa_rows = "".join(f"<tr><td>{e(a)} – {e(b)}</td><td>{_number(k)}</td></tr>"
                         for (a, b), k in stats.pairwise_kappa.items())
    finding_rows = "".join(
        f"<tr><td>{e(f.finding)}</td><td>{_interval(f.accuracy)}</td><td>{f.requested}</td><td>{f.marked}</td>"
        f"<td>{_interval(f.agreement)}</td><td>{_number(f.kappa)}</td></tr>" for f in stats.findings)
    pictures = "".join(f'<img alt="{e(k)}" src="data:image/png;base64,{v}">' for k, v in images.items())
    setup = e(json.dumps(json.loads(study.setup), indent=2, sort_keys=True))
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(study.title)}: report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:left}}img{{margin:.5em;max-width:100%}}
.note{{background:#fff3cd;padding:.6em;border:1px solid #e0c36a}}</style></head><body>
<h1>{e(study.title)}</h1><p>Study <code>{e(study.name)}</code>, {e(study.status)}; {len(readings)} answers.
"Positive" is synthetic: sensitivity is synthetic images called synthetic, specificity real images called real.
Intervals are 95% Clopper–Pearson; p is the exact two-sided binomial test of accuracy = 50%; AUC is from the
call and confidence as one 10-point rating.</p>{f'<p class="note">{e(note)}</p>' if note else ''}
<h2>Readers</h2><table><tr><th>reader</th><th>accuracy</th><th>p (vs 50%)</th><th>sensitivity</th>
<th>specificity</th><th>AUC</th></tr>{reader_rows}</table>
<h2>Inter-reader agreement on the call</h2><table><tr><th>pair</th><th>Cohen's κ</th></tr>{kappa_rows}
<tr><td><b>all readers (Fleiss' κ)</b></td><td>{_number(stats.fleiss_kappa)}</td></tr></table>
<h2>Per finding</h2><p>Accuracy on the cases carrying the finding (truth for real images, the request for synthetic
ones); on synthetic images, how often the readers' marks agree with the requested labels.</p>
<table><tr><th>finding</th><th>accuracy</th><th>requested</th><th>marked when requested</th><th>agreement</th>
<th>Cohen's κ</th></tr>{finding_rows}</table>
<h2>Plots</h2>{pictures}<h2>Set-up</h2><pre>{setup}</pre></body></html>"""
