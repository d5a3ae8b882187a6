"""The study statistics against values worked out here by hand on a fixed answer set: exact binomial
p-values, Clopper-Pearson bounds (by bisection on the binomial tail), AUC (pair counting), Cohen's
and Fleiss' kappa (their definitions), sensitivity, specificity and the per-finding figures."""

from __future__ import annotations

import csv
import io
import math
from itertools import combinations

import pytest

from study.report import statistics_csv
from study.statistics import POOLED, Reading, study_statistics

ORIGIN = ["real"] * 4 + ["synthetic"] * 4
CASE_LABELS = ["No Finding", "Effusion", "Effusion|Mass", "No Finding", "Effusion", "No Finding", "Mass", "Effusion|Mass"]
ANSWERS = {  # reader: (calls, confidences, findings marked)
    "A": ("RRSRSRSS", [5, 3, 2, 4, 4, 1, 3, 5],
          ["No Finding", "Effusion", "Mass", "No Finding", "Effusion", "No Finding", "No Finding", "Mass"]),
    "B": ("RSSRSSRS", [4, 2, 3, 5, 5, 2, 1, 4],
          ["No Finding", "Effusion", "Effusion", "No Finding", "Effusion|Mass", "Effusion", "Mass", "Effusion|Mass"]),
    "C": ("SRRRRSSS", [1, 4, 2, 3, 2, 3, 4, 5],
          ["Mass", "No Finding", "Effusion|Mass", "No Finding", "No Finding", "No Finding", "Mass", "Effusion"]),
}
CALL = {"R": "real", "S": "synthetic"}


def readings() -> list[Reading]:
    return [Reading(reader, case, ORIGIN[case], CALL[calls[case]], confidences[case], CASE_LABELS[case], marks[case])
            for reader, (calls, confidences, marks) in ANSWERS.items() for case in range(8)]


def pmf(k: int, n: int, p: float) -> float:
    return math.comb(n, k) * p**k * (1 - p) ** (n - k)


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p against 1/2: the probability of every outcome no more likely than k."""
    return min(1.0, sum(pmf(j, n, 0.5) for j in range(n + 1) if pmf(j, n, 0.5) <= pmf(k, n, 0.5) * (1 + 1e-9)))


def bisect(f, low: float = 0.0, high: float = 1.0) -> float:
    """Root of an increasing f on [low, high]."""
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if f(middle) < 0 else (low, middle)
    return (low + high) / 2


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Lower: P(X >= k | p) = alpha/2; upper: P(X <= k | p) = alpha/2 (0 and 1 at the ends)."""
    lower = 0.0 if k == 0 else bisect(lambda p: sum(pmf(j, n, p) for j in range(k, n + 1)) - alpha / 2)
    upper = 1.0 if k == n else bisect(lambda p: alpha / 2 - sum(pmf(j, n, p) for j in range(k + 1)))
    return lower, upper


def auc(scores_synthetic: list[int], scores_real: list[int]) -> float:
    pairs = [(s > r) + 0.5 * (s == r) for s in scores_synthetic for r in scores_real]
    return sum(pairs) / len(pairs)


def cohen(a: list, b: list) -> float:
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((a.count(c) / n) * (b.count(c) / n) for c in set(a) | set(b))
    return (observed - expected) / (1 - expected)


def fleiss(table: list[list[str]]) -> float:
    """table[case][reader] -> category."""
    m, cases = len(table[0]), len(table)
    categories = sorted({c for row in table for c in row})
    counts = [[row.count(c) for c in categories] for row in table]
    agreement = sum((sum(x * x for x in row) - m) / (m * (m - 1)) for row in counts) / cases
    shares = [sum(row[j] for row in counts) / (cases * m) for j in range(len(categories))]
    chance = sum(s * s for s in shares)
    return (agreement - chance) / (1 - chance)


def score(call: str, confidence: int) -> int:
    return confidence if call == "S" else -confidence


@pytest.mark.parametrize("reader", ["A", "B", "C", POOLED])
def test_per_reader_and_pooled_figures_match_the_hand_computation(reader):
    stats = study_statistics(readings())
    summary = next(s for s in stats.readers if s.reader == reader)
    names = list(ANSWERS) if reader == POOLED else [reader]
    calls = [(ANSWERS[r][0][c], ANSWERS[r][1][c], ORIGIN[c]) for r in names for c in range(8)]
    correct = sum(CALL[call] == origin for call, _, origin in calls)
    n = len(calls)
    assert (summary.accuracy.count, summary.accuracy.total) == (correct, n)
    assert summary.accuracy.value == pytest.approx(correct / n)
    assert (summary.accuracy.low, summary.accuracy.high) == pytest.approx(clopper_pearson(correct, n), abs=1e-9)
    assert summary.p_value == pytest.approx(binomial_two_sided(correct, n), rel=1e-9)
    synthetic = [(call, conf) for call, conf, origin in calls if origin == "synthetic"]
    real = [(call, conf) for call, conf, origin in calls if origin == "real"]
    assert summary.sensitivity.value == pytest.approx(sum(call == "S" for call, _ in synthetic) / len(synthetic))
    assert summary.specificity.value == pytest.approx(sum(call == "R" for call, _ in real) / len(real))
    assert summary.auc == pytest.approx(auc([score(*s) for s in synthetic], [score(*r) for r in real]))


def test_the_fixed_set_gives_the_numbers_written_here():
    """The same figures as literal values, so that a change in the libraries' conventions shows."""
    stats = study_statistics(readings())
    pooled = stats.readers[-1]
    assert (pooled.accuracy.count, pooled.accuracy.total) == (17, 24)  # A 6, B 5, C 6 of 8
    assert pooled.p_value == pytest.approx(0.0639147, abs=1e-7)  # 2 * P(X >= 17), X ~ B(24, 1/2)
    assert (pooled.accuracy.low, pooled.accuracy.high) == pytest.approx((0.4890522, 0.8738479), abs=1e-7)


def test_inter_reader_agreement_matches_cohen_and_fleiss_by_definition():
    stats = study_statistics(readings())
    for a, b in combinations(ANSWERS, 2):
        assert stats.pairwise_kappa[(a, b)] == pytest.approx(cohen(list(ANSWERS[a][0]), list(ANSWERS[b][0])))
    table = [[ANSWERS[r][0][case] for r in ANSWERS] for case in range(8)]
    assert stats.fleiss_kappa == pytest.approx(fleiss(table))


def test_findings_agree_with_the_requests_as_counted_by_hand():
    stats = study_statistics(readings())
    by_name = {f.finding: f for f in stats.findings}
    for finding in ("Effusion", "Mass", "No Finding"):
        def has(field: str, finding: str = finding) -> int:
            return int(field == "No Finding") if finding == "No Finding" else int(finding in field.split("|"))

        requests = [has(CASE_LABELS[c]) for r in ANSWERS for c in range(4, 8)]
        marks = [has(ANSWERS[r][2][c]) for r in ANSWERS for c in range(4, 8)]
        summary = by_name[finding]
        assert summary.requested == sum(requests)
        assert summary.marked == sum(m for m, q in zip(marks, requests) if q)
        assert summary.agreement.value == pytest.approx(sum(m == q for m, q in zip(marks, requests)) / 12)
        assert summary.kappa == pytest.approx(cohen(requests, marks))
        carrying = [(r, c) for r in ANSWERS for c in range(8) if has(CASE_LABELS[c])]
        correct = sum(CALL[ANSWERS[r][0][c]] == ORIGIN[c] for r, c in carrying)
        assert (summary.accuracy.count, summary.accuracy.total) == (correct, len(carrying))
    assert by_name["Hernia"].accuracy.total == 0 and math.isnan(by_name["Hernia"].accuracy.value)


def test_the_statistics_csv_holds_the_computed_values():
    stats = study_statistics(readings())
    rows = list(csv.DictReader(io.StringIO(statistics_csv(stats))))
    pooled = next(r for r in rows if r["kind"] == "reader" and r["name"] == POOLED)
    assert float(pooled["accuracy_value"]) == pytest.approx(stats.readers[-1].accuracy.value)
    assert float(pooled["auc"]) == pytest.approx(stats.readers[-1].auc)
    fleiss_row = next(r for r in rows if r["kind"] == "fleiss_kappa")
    assert float(fleiss_row["kappa"]) == pytest.approx(stats.fleiss_kappa)
    assert sum(r["kind"] == "cohen_kappa" for r in rows) == 3 and sum(r["kind"] == "finding" for r in rows) == 15


def test_the_html_report_shows_the_tables_and_three_plots():
    import base64

    from study.report import report_html
    from study.storage import Study

    study = Study(name="fixed", title="Fixed answers", status="closed", setup='{"seed": 1}')
    page = report_html(study, readings(), note="scripted answers")
    assert "17/24 = 0.708 [0.489, 0.874]" in page
    assert "scripted answers" in page and "&quot;seed&quot;: 1" in page
    images = [chunk.split('"')[0] for chunk in page.split('src="data:image/png;base64,')[1:]]
    assert len(images) == 3 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
