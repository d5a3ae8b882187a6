"""Same seed, same image: an LCO image is a function of (bundle, execution provider, compute batch,
seed, labels, options) alone, on the trained `ci` bundle (a real PGGAN and classifier, where LCO's
steps turn any last-bit difference into different pixels).

The HTTP side (a request's count, its place in the request, concurrent requests) is in
tests/test_service_e2e.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.bundle import load_bundle
from service.labels import LABEL_INDEX, NUM_LABELS
from service.lco import LCOEngine, LCOOptions, SampleRequest

# Four findings present and the rest absent: hard enough that every sample takes many steps.
HARD = ("Effusion", "Mass", "Nodule", "Hernia")


def exclusive(seed: int, findings=HARD, options: LCOOptions | None = None) -> SampleRequest:
    target = np.zeros(NUM_LABELS, np.float32)
    target[[LABEL_INDEX[name] for name in findings]] = 1.0
    return SampleRequest(target, np.ones(NUM_LABELS, np.float32), seed, options)


@pytest.fixture(scope="module")
def bundle(ci_bundle):
    return load_bundle(ci_bundle)


@pytest.mark.parametrize("compute_batch", [1, 4])
def test_a_seed_gives_back_its_image_alone_in_a_pair_in_eight_and_trickled(bundle, compute_batch):
    engine = LCOEngine(bundle, compute_batch=compute_batch)
    alone = engine.generate([exclusive(1)])[0]
    assert alone.steps > 10, "the request should take many steps, or it tests nothing"
    pair = engine.generate([exclusive(0), exclusive(1)])[1]
    eight = engine.generate([exclusive(seed) for seed in range(8)])[1]
    mixed = engine.generate([exclusive(5, ("Cardiomegaly",)), exclusive(1), exclusive(9, ("Mass",))])[1]
    trickled = LCOEngine(bundle, max_batch=3, compute_batch=compute_batch).generate(
        [exclusive(seed) for seed in (7, 8, 9, 10, 1)])[4]
    for other in (pair, eight, mixed, trickled):
        assert other.seed == 1 and other.steps == alone.steps
        assert np.array_equal(other.image, alone.image)
        assert np.array_equal(other.probabilities, alone.probabilities)

