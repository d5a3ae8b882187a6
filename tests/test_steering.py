"""Steer cheap, accept strict: a bundle whose ``lco_step.onnx`` steers by another network than its
classifier (``export --steering``), and the engine that accepts an image only when the classifier agrees.

The bundle is `ci` with `auditor-ci` as the steering network (tests/bundle_fixtures.py:
``ci_steered_bundle``): two independently trained networks, so they disagree often enough for the
classifier's checks to matter.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from service.bundle import MANIFEST_NAME, load_bundle, seal_manifest
from service.labels import LABELS
from service.lco import RECHECK_STEPS, LCOEngine, LCOOptions, SampleRequest, satisfied
from service.schemas import resolve_labels
from tests.bundle_fixtures import copy_bundle

OPTIONS = LCOOptions(steps=24, candidates=4)
FINDINGS = ["Effusion", "Cardiomegaly", "Nodule", "Pneumothorax"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def samples(seed: int = 900, per_finding: int = 3) -> list[SampleRequest]:
    requests = []
    for number, finding in enumerate(FINDINGS):
        spec = resolve_labels([finding], exclusive=False)
        requests += [SampleRequest(spec.target, spec.mask, seed + 10 * number + i, OPTIONS) for i in range(per_finding)]
    return requests


@pytest.fixture(scope="module")
def bundle(ci_steered_bundle):
    return load_bundle(ci_steered_bundle)


@pytest.fixture(scope="module")
def run(bundle):
    engine = LCOEngine(bundle, OPTIONS, max_batch=8)
    requests = samples()
    return engine, requests, engine.generate(requests)


def test_the_manifest_names_the_steering_network_and_the_step_graph_steers_by_it(bundle, ci_models, ci_auditor):
    from training.classifier.artifact import TrainedClassifier

    steering = TrainedClassifier.load(ci_auditor)
    manifest = bundle.manifest
    assert manifest.steering is not None and manifest.steering.preset == "auditor-ci"
    assert manifest.steering.passes == 1 and manifest.classifier_passes == 1
    np.testing.assert_allclose(bundle.steering_thresholds, steering.thresholds, rtol=1e-6)
    z = np.random.default_rng(0).standard_normal((3, manifest.latent_dim)).astype(np.float32)
    target = np.ones((3, len(LABELS)), np.float32)
    step = bundle.lco_step(z, target, target)
    with torch.no_grad():
        steering_logits = steering.network.eval()(torch.from_numpy(step.image))[0].numpy()
    np.testing.assert_allclose(step.probs, _sigmoid(steering_logits), atol=1e-4)
    classifier_probs = _sigmoid(bundle.classify(step.image)[0])
    assert np.abs(step.probs - classifier_probs).max() > 0.05  # two networks, two readings


def test_every_image_carries_the_classifiers_reading_and_stops_only_where_it_agrees(run, bundle):
    engine, requests, results = run
    assert engine.checks_steps
    stepped = [(r, s) for r, s in zip(results, requests) if r.steps > 0]
    assert stepped, "no sample needed LCO: the test would check nothing"
    for result, request in zip(results, requests):
        probs = _sigmoid(bundle.classify(result.image[None, None])[0])[0]
        np.testing.assert_allclose(result.probabilities, probs, atol=2e-3)  # clipping to [-1, 1] moves a few pixels
        assert result.satisfied == bool(satisfied(result.probabilities[None], request.target[None],
                                                  request.mask[None], engine.thresholds, 0.0)[0])
    stopped_early = [(r, s) for r, s in stepped if r.steps < OPTIONS.steps]
    for result, request in stopped_early:  # stopped before the cap: the classifier met the margin
        assert satisfied(result.probabilities[None], request.target[None], request.mask[None], engine.thresholds,
                         OPTIONS.margin, OPTIONS.absent_margin)[0]


def test_the_classifier_is_consulted_at_most_once_per_recheck_interval_and_at_the_cap(run):
    engine, _, results = run
    checks = engine.stats.checked_samples
    assert checks > 0
    # per sample: the first step its steering network is satisfied, every RECHECK_STEPS steps after, the cap
    bound = sum(-(-(r.steps + 1) // RECHECK_STEPS) + 1 for r in results if r.steps > 0 or not r.accepted_without_steps)
    assert checks <= bound


def test_same_seed_same_image_alone_or_in_a_batch(run, bundle):
    _, requests, results = run
    engine = LCOEngine(bundle, OPTIONS, max_batch=8)
    for index in (0, 5, 10):
        again = engine.generate([requests[index]])[0]
        assert again.steps == results[index].steps
        assert again.image.tobytes() == results[index].image.tobytes()


def test_a_bundle_without_a_steering_section_steers_and_accepts_by_its_classifier(ci_bundle):
    plain = load_bundle(ci_bundle)
    assert plain.manifest.steering is None
    engine = LCOEngine(plain, OPTIONS)
    assert not engine.checks_steps
    np.testing.assert_array_equal(engine.steering_thresholds, engine.thresholds)


def test_a_steering_section_with_a_threshold_missing_is_refused(ci_steered_bundle, tmp_path):
    bundle = copy_bundle(ci_steered_bundle, tmp_path / "broken")
    document = json.loads((bundle / MANIFEST_NAME).read_text())
    document.pop("manifest_sha256")
    document["steering"]["thresholds"].pop("Hernia")
    with pytest.raises(ValueError, match=r"steering.thresholds must name every label once \(missing \['Hernia'\]"):
        seal_manifest(document)


def test_a_step_the_steering_network_accepts_and_the_classifier_refuses_goes_on(bundle):
    """At a margin the weak steering network reaches and the `ci` classifier does not follow, some checks
    refuse: those samples step on instead of stopping, and none stops short of the classifier's margin.
    Every sample that steps ends on a check (its acceptance or its cap), so the checks beyond one per
    stepping sample are the refusals."""
    options = LCOOptions(steps=40, candidates=4, margin=0.5, fallback_margin=0.3)
    engine = LCOEngine(bundle, options, max_batch=8)
    requests = [replace(sample, options=options) for sample in samples(seed=700)]
    results = engine.generate(requests)
    stepped = [(r, s) for r, s in zip(results, requests) if r.steps > 0]
    refusals = engine.stats.checked_samples - len(stepped)
    assert refusals > 0
    for result, request in stepped:
        if result.steps < options.steps:
            assert satisfied(result.probabilities[None], request.target[None], request.mask[None], engine.thresholds,
                             options.margin, options.absent_margin)[0]
