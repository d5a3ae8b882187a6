"""Rejection first in the LCO engine, on the trained `ci` bundle (a real PGGAN and classifier, with
the acceptance table its export wrote): the first latent in seed order that meets the request at the
margin is returned with 0 steps, else LCO starts from the best of the first `candidates`; the budget
follows the request's acceptance rate; same seed, same image whatever shares the batch; off, the
engine is the one before it (also tests/test_reproducibility.py's pinned images).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from service.acceptance import (
    ACCEPTANCE_FILE,
    ACCEPTANCE_SEED,
    DEFAULT_STEP_COST,
    prior_rate,
    rejection_budget,
)
from service.archive import ArchiveSpec, merge_archive, run_shard
from service.archive.cli import load_engine
from service.archive.runner import RunOptions
from service.bundle import MANIFEST_NAME, load_bundle, seal_manifest
from service.labels import LABEL_INDEX, LABELS, NUM_LABELS
from service.lco import LCOEngine, LCOOptions, SampleRequest, draw_latents, satisfied
from service.prior import nih_prior
from service.sinks import LocalSink

# All 14 constrained, four present, at the default margin: never met by the `ci` generator's samples.
HARD = ("Effusion", "Mass", "Nodule", "Hernia")
FAST = {"steps": 30, "candidates": 4}


def vectors(present=(), absent=(), exclusive=False) -> tuple[np.ndarray, np.ndarray]:
    target = np.zeros(NUM_LABELS, np.float32)
    mask = np.full(NUM_LABELS, 1.0 if exclusive else 0.0, np.float32)
    for name in present:
        target[LABEL_INDEX[name]] = mask[LABEL_INDEX[name]] = 1.0
    for name in absent:
        mask[LABEL_INDEX[name]] = 1.0
    return target, mask


def steady(table):
    """The acceptance table with the documented step cost in place of the one the export timed: that
    timing follows the machine's load (1.1–1.6 forward passes on a busy 2-core CPU), and with it the
    budgets, so a test that needs a budget beyond the pool fixes it."""
    return replace(table, step_cost=DEFAULT_STEP_COST)


@pytest.fixture(scope="module")
def bundle(ci_bundle):
    bundle = load_bundle(ci_bundle)
    bundle.acceptance = steady(bundle.acceptance)
    return bundle


@pytest.fixture(scope="module")
def common(bundle) -> tuple[np.ndarray, np.ndarray]:
    """The single finding the `ci` generator meets most often at the margin, but not always."""
    engine = LCOEngine(bundle)
    rates = {name: engine.acceptance_rate(*vectors([name]), LCOOptions().margin) for name in LABELS}
    name = max((n for n in LABELS if rates[n] < 0.7), key=rates.get)
    assert rates[name] > 0.02, f"the ci generator meets no finding often enough: {rates}"
    return vectors([name])


def hard(seed: int, options: LCOOptions | None = None) -> SampleRequest:
    return SampleRequest(*vectors(HARD, exclusive=True), seed, options)


def first_hit(bundle, sample: SampleRequest, options: LCOOptions, budget: int):
    """A plain loop: draw_latents, generator, classifier, the rule; (position, image, probs) or None."""
    for position, z in enumerate(draw_latents(sample.seed, budget, bundle.manifest.latent_dim, options.truncation)):
        image = bundle.generate(z[None])
        probs = 1 / (1 + np.exp(-bundle.classify(image)[0].astype(np.float64)))
        if satisfied(probs, sample.target[None], sample.mask[None], bundle.thresholds, options.margin,
                     options.absent_margin)[0]:
            return position, image[0, 0], probs[0]
    return None


def test_the_budget_rule():
    # rejection pays where 1/rate draws cost less than LCO's cap (steps x step cost), for at most that cost
    assert rejection_budget(0.2, steps=200, step_cost=8.0, candidates=32, max_candidates=1024) == 1024
    assert rejection_budget(0.2, steps=100, step_cost=3.0, candidates=32, max_candidates=1024) == 300
    assert rejection_budget(0.001, steps=200, step_cost=3.0, candidates=32, max_candidates=1024) == 32
    assert rejection_budget(0.0, steps=200, step_cost=8.0, candidates=32, max_candidates=1024) == 32
    assert rejection_budget(0.5, steps=0, step_cost=8.0, candidates=4, max_candidates=1024) == 4
    assert rejection_budget(0.9, steps=5, step_cost=3.0, candidates=32, max_candidates=1024) == 32
    with pytest.raises(ValueError, match="max_candidates\n  Input should be less than or equal to 65536"):
        LCOOptions(max_candidates=70_000)


def test_without_a_table_the_rates_come_from_the_nih_prior(bundle):
    plain = SimpleNamespace(manifest=bundle.manifest, sessions=bundle.sessions, thresholds=bundle.thresholds)
    engine = LCOEngine(plain)
    assert engine.acceptance is None and engine.step_cost == DEFAULT_STEP_COST
    hernia = vectors(["Hernia"])
    assert engine.acceptance_rate(*hernia, 1.8) == pytest.approx(nih_prior().prevalence()["Hernia"])
    assert prior_rate(*vectors(exclusive=True)) == pytest.approx(nih_prior().prevalence()["No Finding"])
    # Hernia: 1/0.002 = 500 draws < 200 steps x 3: a budget of 600 latents
    assert engine.rejection_budget(SampleRequest(*hernia, 0)) == 600


def test_the_export_writes_an_acceptance_table_that_the_bundle_lists_and_a_bundle_without_it_loads(
        bundle, ci_bundle, tmp_path):
    assert ACCEPTANCE_FILE in bundle.manifest.files
    table = load_bundle(ci_bundle).acceptance  # as the export wrote it, its timed step cost included
    assert table.logits.shape == (2048, NUM_LABELS) and 0 < table.step_cost < 1000
    # its rows are the classifier's logits on the generator's samples of the documented seeds
    z = np.concatenate([draw_latents(ACCEPTANCE_SEED + i, 1, bundle.manifest.latent_dim, None) for i in (0, 777)])
    logits = bundle.classify(bundle.generate(z))[0]
    np.testing.assert_allclose(table.logits[[0, 777]], logits, atol=1e-4)

    without = shutil.copytree(ci_bundle, tmp_path / "without-table")
    (without / ACCEPTANCE_FILE).unlink()
    document = json.loads((without / MANIFEST_NAME).read_text())
    del document["files"][ACCEPTANCE_FILE], document["manifest_sha256"]
    (without / MANIFEST_NAME).write_bytes(seal_manifest(document))
    assert load_bundle(without).acceptance is None


def test_the_accepted_latent_is_the_first_in_seed_order_that_meets_the_rule(bundle, common):
    options = LCOOptions(**FAST)
    engine = LCOEngine(bundle, options)
    samples = [SampleRequest(*common, seed) for seed in range(8)]
    budget = engine.rejection_budget(samples[0])
    assert budget > options.candidates, "a common request should get a rejection budget beyond the pool"
    positions = []
    for sample, result in zip(samples, engine.generate(samples)):
        # the budget follows the step cost timed at export, so a seed may find no hit within it
        hit = first_hit(bundle, sample, options, budget)
        if hit is None:
            assert not result.accepted_without_steps and result.candidates_scored == budget
            continue
        position, image, probs = hit
        positions.append(position)
        assert result.accepted_without_steps and result.steps == 0 and result.satisfied
        assert result.candidates_scored == position + 1
        assert np.array_equal(result.image, np.clip(image, -1, 1))
        np.testing.assert_allclose(result.probabilities, probs, atol=1e-5)
    assert len(positions) >= 4, "a common request should mostly be met within its budget; pick another"
    assert max(positions) > 0, "every first latent met the request: the test cannot tell first from any"


def test_labels_requested_absent_are_met_at_the_absent_margin_in_the_table_and_the_search(bundle):
    """"No Finding" (all 14 absent): the nearer absent margin is met by more of the table's samples,
    and rejection first returns the first latent that meets it (a plain loop at that rule agrees)."""
    engine = LCOEngine(bundle)
    no_finding = vectors(exclusive=True)
    rates = [engine.acceptance_rate(*no_finding, 1.8, absent) for absent in (1.8, 1.0, 0.3)]
    assert rates == sorted(rates) and rates[-1] > rates[0] and rates[-1] > 0.05, rates
    options = LCOOptions(**FAST, absent_margin=0.3)
    engine = LCOEngine(bundle, options)
    samples = [SampleRequest(*no_finding, seed) for seed in range(6)]
    budget = engine.rejection_budget(samples[0])
    relaxed = 0
    for sample, result in zip(samples, engine.generate(samples)):
        hit = first_hit(bundle, sample, options, budget)
        assert hit is not None and result.accepted_without_steps and result.candidates_scored == hit[0] + 1
        assert np.array_equal(result.image, np.clip(hit[1], -1, 1))
        relaxed += not satisfied(result.probabilities[None], sample.target[None], sample.mask[None],
                                 bundle.thresholds, 1.8)[0]
    assert relaxed, "every accepted image met the full margin too: the test cannot tell the two rules apart"


def test_a_request_no_latent_meets_goes_to_lco_from_the_best_of_the_pool_as_before(bundle):
    engine = LCOEngine(bundle, LCOOptions(**FAST))
    sample = hard(1)
    assert engine.acceptance_rate(sample.target, sample.mask, 1.8) == 0.0
    assert engine.rejection_budget(sample) == FAST["candidates"]
    on = engine.generate([sample])[0]
    off = engine.generate([hard(1, LCOOptions(**FAST, rejection_first=False))])[0]
    assert on.steps > 0 and not on.accepted_without_steps and on.candidates_scored == FAST["candidates"]
    assert on.steps == off.steps and np.array_equal(on.image, off.image)
    assert np.array_equal(on.probabilities, off.probabilities)


@pytest.mark.parametrize("compute_batch", [1, 4])
def test_same_seed_same_image_whatever_shares_the_batch(bundle, common, compute_batch):
    engine = LCOEngine(bundle, LCOOptions(**FAST), compute_batch=compute_batch)
    accepted, stepped = SampleRequest(*common, 3), hard(1)
    alone = engine.generate([accepted])[0], engine.generate([stepped])[0]
    assert alone[0].accepted_without_steps and alone[1].steps > 0
    others = [SampleRequest(*common, 100 + i) if i % 2 else hard(200 + i) for i in range(9)]
    crowded = engine.generate(others[:4] + [accepted] + others[4:7] + [stepped] + others[7:])
    trickled = LCOEngine(bundle, LCOOptions(**FAST), max_batch=3, compute_batch=compute_batch).generate(
        [stepped, *others[:5], accepted, *others[5:]])
    for got in ((crowded[4], crowded[8]), (trickled[6], trickled[0])):
        for want, other in zip(alone, got):
            assert (other.seed, other.steps, other.candidates_scored) == (want.seed, want.steps, want.candidates_scored)
            assert np.array_equal(other.image, want.image) and np.array_equal(other.probabilities, want.probabilities)


def test_a_search_scores_one_chunk_per_round_and_does_not_hold_up_the_samples_stepping(bundle, common):
    """At compute_batch 1 a searching sample scores one latent per round: no round holds more forward
    passes than there are samples searching, none is scored past a hit, and a sample stepping beside
    the searches finishes in as many rounds as alone."""
    engine = LCOEngine(bundle, LCOOptions(**FAST))
    stepped = hard(1)
    searches = [SampleRequest(*common, seed) for seed in range(10, 16)]
    assert engine.rejection_budget(searches[0]) > FAST["candidates"]

    def run(samples):
        pending, per_round, results = list(enumerate(samples)), [], {}

        def take(running: int) -> list | None:
            nonlocal pending
            joining, pending = pending, []
            return [(sample, tag) for tag, sample in joining] if (joining or running) else None

        def on_step(size: int) -> None:
            per_round.append((size, engine.stats.forward_samples))

        def deliver(tag, result) -> None:
            results[tag] = (result, len(per_round))

        engine.drive(take, deliver, on_step=on_step)
        return results, per_round

    alone, _ = run([stepped])
    crowded, per_round = run([stepped, *searches])
    assert crowded[0][1] == alone[0][1] and np.array_equal(crowded[0][0].image, alone[0][0].image)
    forwards = np.diff([count for _, count in per_round] + [engine.stats.forward_samples])
    assert all(spent <= size for (size, _), spent in zip(per_round, forwards))
    assert forwards.sum() == sum(result.candidates_scored for result, _ in crowded.values())


def test_archive_records_and_marker_say_which_images_were_accepted_without_steps(ci_bundle, common, tmp_path):
    engine, model = load_engine(str(ci_bundle), max_batch=16)
    engine.acceptance = steady(engine.acceptance)
    present = [LABELS[i] for i in np.flatnonzero(common[0])]
    spec = ArchiveSpec(destination=str(tmp_path), seed=3, lco=FAST, chunk_size=4,
                       distribution=[{"labels": present, "count": 4}, {"labels": list(HARD), "count": 2,
                                                                       "exclusive": True}])
    report = run_shard(spec, engine, model, options=RunOptions(progress=False))
    marker = merge_archive(LocalSink(tmp_path), progress=False)
    records = [json.loads(line) for path in sorted((tmp_path / "manifests").rglob("*.jsonl"))
               for line in path.read_text().splitlines()]
    assert len(records) == 6
    for record in records:
        assert record["accepted_without_steps"] == (record["steps"] == 0 and record["satisfied"])
        assert 1 <= record["candidates_scored"]
    hard_records = [r for r in records if r["requested"].get("Hernia")]
    assert [r["accepted_without_steps"] for r in hard_records] == [False, False]
    assert all(r["candidates_scored"] == FAST["candidates"] for r in hard_records)
    accepted = sum(r["accepted_without_steps"] for r in records)
    assert accepted >= 1 and report.accepted_without_steps == marker["accepted_without_steps"] == accepted
    assert math.isfinite(report.seconds)
