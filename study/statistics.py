"""The reader study's statistics, from scipy, statsmodels and scikit-learn.

"Positive" is *synthetic* throughout, as in a detection task (Jang et al. 2023 report accuracy and
inter-reader kappa in the same form; Segal et al. 2021 the share of synthetic images called real).

- accuracy with Clopper-Pearson 95% intervals (``statsmodels proportion_confint(method="beta")``) and
  an exact two-sided binomial test against 50% (``scipy.stats.binomtest``), per reader and pooled;
- sensitivity (synthetic called synthetic) and specificity (real called real), with the same intervals;
- ROC AUC from the confidence ratings (``sklearn.metrics.roc_auc_score``): a call and its 1-5
  confidence give one 10-point score, -5 (sure real) ... -1, +1 ... +5 (sure synthetic);
- inter-reader agreement on the call: Cohen's kappa per pair of readers (``cohen_kappa_score``) and
  Fleiss' kappa over all readers (``statsmodels.stats.inter_rater.fleiss_kappa``), on the cases every
  reader of the pair (or every reader) answered;
- per finding: accuracy on the cases carrying it (truth for real images, the request for synthetic
  ones), and on synthetic images the agreement between the findings readers marked and the requested
  labels (observed agreement and Cohen's kappa).

A statistic that is undefined on the answers given (AUC with one class, kappa of one reader) is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

from service.labels import LABELS, NO_FINDING, parse_finding_labels

POOLED = "pooled"
CONFIDENCE_LEVEL = 0.95


@dataclass(frozen=True)
class Reading:
    """One stored answer with its case's truth. ``findings`` is None when the study did not ask."""

    reader: str
    case: int
    origin: str  # "real" | "synthetic"
    call: str  # "real" | "synthetic"
    confidence: int  # 1-5
    case_labels: str  # NIH "Finding Labels" of the case ("" unknown)
    findings: str | None = None

    @property
    def correct(self) -> bool:
        return self.call == self.origin

    @property
    def score(self) -> int:
        """-5 … -1 (real, sure to unsure), +1 … +5 (synthetic, unsure to sure)."""
        return self.confidence if self.call == "synthetic" else -self.confidence


@dataclass(frozen=True)
class Proportion:
    count: int
    total: int
    value: float
    low: float
    high: float

    @classmethod
    def of(cls, count: int, total: int) -> Proportion:
        if total == 0:
            return cls(0, 0, math.nan, math.nan, math.nan)
        low, high = proportion_confint(count, total, alpha=1 - CONFIDENCE_LEVEL, method="beta")
        return cls(count, total, count / total, float(low), float(high))


@dataclass(frozen=True)
class ReaderSummary:
    reader: str
    accuracy: Proportion
    p_value: float  # exact two-sided binomial test of accuracy = 0.5
    sensitivity: Proportion  # synthetic called synthetic
    specificity: Proportion  # real called real
    auc: float


@dataclass(frozen=True)
class FindingSummary:
    finding: str
    accuracy: Proportion  # real/synthetic call on cases carrying the finding
    requested: int  # synthetic readings whose request holds the finding (findings asked)
    marked: int  # of those readings, how many the reader marked it on
    agreement: Proportion  # marks equal to the request, over synthetic readings with findings asked
    kappa: float  # Cohen's kappa between marks and requests on those readings


@dataclass(frozen=True)
class StudyStatistics:
    readers: list[ReaderSummary]  # one per reader, then the pooled row
    pairwise_kappa: dict[tuple[str, str], float]
    fleiss_kappa: float
    findings: list[FindingSummary]


def summarise(name: str, readings: Sequence[Reading]) -> ReaderSummary:
    correct = sum(r.correct for r in readings)
    synthetic = [r for r in readings if r.origin == "synthetic"]
    real = [r for r in readings if r.origin == "real"]
    truth = [r.origin == "synthetic" for r in readings]
    auc = float(roc_auc_score(truth, [r.score for r in readings])) if 0 < sum(truth) < len(truth) else math.nan
    return ReaderSummary(
        reader=name,
        accuracy=Proportion.of(correct, len(readings)),
        p_value=float(binomtest(correct, len(readings), 0.5).pvalue) if readings else math.nan,
        sensitivity=Proportion.of(sum(r.call == "synthetic" for r in synthetic), len(synthetic)),
        specificity=Proportion.of(sum(r.call == "real" for r in real), len(real)),
        auc=auc,
    )


def _calls_by_case(readings: Sequence[Reading], reader: str) -> dict[int, str]:
    return {r.case: r.call for r in readings if r.reader == reader}


def pairwise_kappa(readings: Sequence[Reading], readers: Sequence[str]) -> dict[tuple[str, str], float]:
    result = {}
    for a, b in combinations(readers, 2):
        calls_a, calls_b = _calls_by_case(readings, a), _calls_by_case(readings, b)
        shared = sorted(set(calls_a) & set(calls_b))
        result[(a, b)] = (float(cohen_kappa_score([calls_a[c] for c in shared], [calls_b[c] for c in shared],
                                                  labels=["real", "synthetic"]))
                          if shared else math.nan)
    return result


def overall_fleiss_kappa(readings: Sequence[Reading], readers: Sequence[str]) -> float:
    calls = [_calls_by_case(readings, reader) for reader in readers]
    shared = sorted(set.intersection(*(set(c) for c in calls))) if len(readers) > 1 else []
    if not shared:
        return math.nan
    table = np.array([[int(c[case] == "synthetic") for c in calls] for case in shared])
    counts, _ = aggregate_raters(table, n_cat=2)
    return float(fleiss_kappa(counts, method="fleiss"))


def _carries(finding_labels: str, index: int) -> int:
    """1 if the NIH "Finding Labels" field holds finding ``index`` (14: "No Finding")."""
    vector = parse_finding_labels(finding_labels)
    return int(vector.sum() == 0) if index == len(LABELS) else int(vector[index])


def finding_summaries(readings: Sequence[Reading]) -> list[FindingSummary]:
    result = []
    known = [r for r in readings if r.case_labels]
    asked = [r for r in known if r.origin == "synthetic" and r.findings is not None]
    for index, finding in enumerate([*LABELS, NO_FINDING]):
        carrying = [r for r in known if _carries(r.case_labels, index)]
        requests = [_carries(r.case_labels, index) for r in asked]
        marks = [_carries(r.findings, index) for r in asked]
        kappa = float(cohen_kappa_score(requests, marks, labels=[0, 1])) if len(set(requests) | set(marks)) > 1 else math.nan
        result.append(FindingSummary(
            finding=finding, accuracy=Proportion.of(sum(r.correct for r in carrying), len(carrying)),
            requested=sum(requests), marked=sum(m for m, q in zip(marks, requests) if q),
            agreement=Proportion.of(sum(a == b for a, b in zip(requests, marks)), len(asked)), kappa=kappa,
        ))
    return result


def study_statistics(readings: Sequence[Reading]) -> StudyStatistics:
    """Every statistic of the module docstring for ``readings`` (any number of readers)."""
    readers = sorted({r.reader for r in readings})
    rows = [summarise(reader, [r for r in readings if r.reader == reader]) for reader in readers]
    rows.append(summarise(POOLED, readings))
    return StudyStatistics(rows, pairwise_kappa(readings, readers), overall_fleiss_kappa(readings, readers),
                           finding_summaries(readings))


def statistics_rows(stats: StudyStatistics) -> list[dict[str, object]]:
    """Flat rows for CSV: one per reader (and pooled), one per reader pair, one Fleiss, one per finding."""
    rows: list[dict[str, object]] = []
    for summary in stats.readers:
        row: dict[str, object] = {"kind": "reader", "name": summary.reader}
        for field in ("accuracy", "sensitivity", "specificity"):
            for key, value in asdict(getattr(summary, field)).items():
                row[f"{field}_{key}"] = value
        row |= {"p_value": summary.p_value, "auc": summary.auc}
        rows.append(row)
    for (a, b), kappa in stats.pairwise_kappa.items():
        rows.append({"kind": "cohen_kappa", "name": f"{a} | {b}", "kappa": kappa})
    rows.append({"kind": "fleiss_kappa", "name": POOLED, "kappa": stats.fleiss_kappa})
    for finding in stats.findings:
        row = {"kind": "finding", "name": finding.finding}
        for key, value in asdict(finding.accuracy).items():
            row[f"accuracy_{key}"] = value
        row |= {"requested": finding.requested, "marked": finding.marked,
                "agreement_value": finding.agreement.value, "agreement_total": finding.agreement.total,
                "kappa": finding.kappa}
        rows.append(row)
    return rows
