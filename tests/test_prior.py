import csv
import gzip

import numpy as np
import pytest

from service.labels import LABELS, NO_FINDING, parse_finding_labels
from service.prior import balanced_prior, get_prior, nih_boosted_prior, nih_prior


@pytest.fixture(scope="module")
def csv_prevalence(nih_csv):
    with gzip.open(nih_csv, "rt", newline="") as handle:
        vectors = np.stack([parse_finding_labels(row["Finding Labels"]) for row in csv.DictReader(handle)])
    return vectors.mean(axis=0), float((vectors.sum(axis=1) == 0).mean())


def test_shipped_prior_matches_the_real_csv_exactly(csv_prevalence):
    marginals, no_finding = csv_prevalence
    prevalence = nih_prior().prevalence()
    np.testing.assert_allclose([prevalence[label] for label in LABELS], marginals, atol=1e-9)
    assert prevalence[NO_FINDING] == pytest.approx(no_finding, abs=1e-9)


def test_samples_from_the_prior_are_within_one_percent(csv_prevalence):
    marginals, no_finding = csv_prevalence
    draws = nih_prior().sample(50_000, np.random.default_rng(7))
    assert np.abs(draws.mean(axis=0) - marginals).max() < 0.01
    assert abs((draws.sum(axis=1) == 0).mean() - no_finding) < 0.01


def test_balanced_prior_is_uniform_over_findings():
    draws = balanced_prior().sample(30_000, np.random.default_rng(0))
    assert draws.sum(axis=1).max() == 1
    np.testing.assert_allclose(draws.mean(axis=0), 1 / 15, atol=0.01)


def test_boosted_prior_keeps_nih_combinations_and_lifts_every_finding(csv_prevalence):
    marginals, no_finding = csv_prevalence
    prevalence = nih_boosted_prior().prevalence()
    np.testing.assert_allclose([prevalence[label] for label in LABELS], (marginals + 1 / 15) / 2, atol=1e-9)
    assert prevalence[NO_FINDING] == pytest.approx((no_finding + 1 / 15) / 2, abs=1e-9)
    assert min(prevalence[label] for label in LABELS) > 1 / 30
    draws = get_prior("nih-boosted").sample(20_000, np.random.default_rng(3))
    assert 0.05 < (draws.sum(axis=1) >= 2).mean() < 0.15  # NIH's multi-finding combinations, at half their rate
    np.testing.assert_allclose(draws.mean(axis=0), (marginals + 1 / 15) / 2, atol=0.01)


def test_unknown_prior_names_the_choices():
    with pytest.raises(ValueError, match="nih, balanced, nih-boosted"):
        get_prior("uniform")


def test_a_prior_given_a_request_is_its_conditional_distribution():
    prior = nih_prior()
    hernia = np.eye(len(LABELS), dtype=np.float32)[LABELS.index("Hernia")]
    given = prior.given(hernia, hernia)
    assert (given.combinations[:, LABELS.index("Hernia")] == 1).all()
    assert given.probabilities.sum() == pytest.approx(1.0)
    # P(combination | Hernia) = P(combination) / P(Hernia), for every combination with a hernia
    with_hernia = prior.combinations[:, LABELS.index("Hernia")] == 1
    np.testing.assert_allclose(given.probabilities, prior.probabilities[with_hernia] / prior.probabilities[with_hernia].sum())
    assert given.prevalence()["Hernia"] == pytest.approx(1.0)
    no_finding = prior.given(np.zeros(len(LABELS)), np.ones(len(LABELS)))
    assert len(no_finding.combinations) == 1 and no_finding.prevalence()[NO_FINDING] == pytest.approx(1.0)
