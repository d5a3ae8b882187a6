"""Same seed, same image: an LCO image is a function of (bundle, execution provider, compute batch,
seed, labels, options) alone, on the trained `ci` bundle (a real PGGAN and classifier, where LCO's
steps turn any last-bit difference into different pixels).

The HTTP side (a request's count, its place in the request, concurrent requests) is in
tests/test_service_e2e.py.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from service.bundle import load_bundle
from service.counterfactual import MAX_IMAGE_PULL, edit_sample, plan_edit
from service.labels import LABEL_INDEX, NUM_LABELS
from service.lco import MAX_MARGIN, LCOEngine, LCOOptions, SampleRequest
from service.png import encode_png

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



# (steps, sha256 of the 16-bit PNG) made on the `ci` bundle by an earlier engine (first d0ce384, before
# the service's restructuring; re-pinned at 66090f6, which matched those, when the ci networks began
# training on one thread), pinned so that a refactoring provably changes no byte. The
# `ci` bundle's training and inference are deterministic on one kind of CPU, but torch and ONNX Runtime
# pick their kernels by the CPU's vector instructions, so each kind of CPU the suite runs on has its
# own pins, made from the same engine; a change that alters an image matches none of them. A change
# that means to alter images or training re-pins these, saying so. Made with rejection first off and
# one margin for both sides of a label: the engine before either (tests/test_rejection_first.py has
# the path with them).
PINNED_REQUESTS = [  # labels, exclusive, seed
    ({"Effusion": True, "Mass": True, "Nodule": True, "Hernia": True}, True, 1),
    ({"Cardiomegaly": True}, False, 7),
    ({"Pneumothorax": False, "Atelectasis": True}, False, 42),
    ({}, True, 3),
]
PINNED = {
    # The ci networks trained on one torch thread (tests/bundle_fixtures.py). Made at 66090f6 and again
    # with the step exported anew and a pass's chunks side by side: the same four.
    "AMD EPYC, AVX2 without AVX-512": [
        (200, "2c4e9026b71f4e32771ae0f175b17fb75dcff3576674152adfeec186465605ee"),
        (200, "7d45a3d582c4e2d34e24b2ced742eeb9f6d3aaaa1012903704977ce35a136725"),
        (200, "f0774ba62bd2abec476454dcd2b765cd367e13e01585812b53dcfa327bcc4205"),
        (15, "c6e787fddfa1cb33f04dfe429dde4641ec962653fad70826540abd5da642ce07"),
    ],
    # The same kind of CPU on a fresh install of 20261202 (onnxruntime 1.32.0, torch 2.13.0, numpy 2.4.6):
    # ad77b39's engine, before the steering network, gives exactly these four too, so they pin the same
    # engine; a library's new kernels moved the ci networks' weights or the step's last bits.
    "AMD EPYC, AVX2 without AVX-512, onnxruntime 1.32": [
        (200, "4190aed3b35056ea1bdb162375fe2a9ce994a5e51a254e1e18e342f724dadb43"),
        (200, "c929f10e92d81b7b403b96552723ba997ec00416b3b92b55e6d49bc456e7626f"),
        (200, "0ad8f1139ffac0746f8de77caa638f1b2095fd48d9097053238cb63ecd0a3404"),
        (20, "eb112b7e7df0834f3ed06be3f934d7409ebc1794c882423a2db4f67fd2055eaa"),
    ],
}


def test_pinned_images_are_byte_for_byte_what_they_were(bundle):
    samples = []
    for labels, exclusive, seed in PINNED_REQUESTS:
        target = np.zeros(NUM_LABELS, np.float32)
        mask = np.full(NUM_LABELS, 1.0 if exclusive else 0.0, np.float32)
        for name, present in labels.items():
            target[LABEL_INDEX[name]], mask[LABEL_INDEX[name]] = float(present), 1.0
        samples.append(SampleRequest(target, mask, seed))
    # the engine the pins were made with: later options that change images are off
    options = LCOOptions(rejection_first=False, absent_margin=LCOOptions().margin, balance_sides=False)
    results = LCOEngine(bundle, options).generate(samples)
    got = [(r.steps, hashlib.sha256(encode_png(r.image, "png16")).hexdigest()) for r in results]
    assert got in PINNED.values(), (f"{got} matches the pins of no kind of CPU ({', '.join(PINNED)}): the engine "
                                    "changed its images, or this kind of CPU needs its own pins")


@pytest.mark.parametrize("compute_batch", [1, 4])
def test_an_edit_pulled_towards_the_originals_pixels_stays_closer_and_is_a_function_of_its_request(bundle,
                                                                                                     compute_batch):
    """POST /edit's image proximity on the real step graph: the edited image lies nearer the original's
    pixels than the same edit without the term, and it is the same image alone, beside plain samples
    (whose chunk holds no reference) and at another place in the batch."""
    engine = LCOEngine(bundle, compute_batch=compute_batch)
    options = LCOOptions(steps=40, candidates=1, margin=MAX_MARGIN, absent_margin=MAX_MARGIN, rejection_first=False)  # 40 steps each
    reference = exclusive(3, ("Effusion",), options)
    original = engine.generate([reference])[0]
    spec = plan_edit(reference.target, reference.mask, ["Mass"], [])
    latent_only, pixels = (edit_sample(spec, original, 0.0, image_pull, options) for image_pull in (0.0, MAX_IMAGE_PULL))
    free, held = engine.generate([latent_only, pixels])
    assert free.steps == held.steps == 40

    def distance(result):
        return float(np.mean((result.image - original.image) ** 2))

    assert distance(held) < 0.5 * distance(free), (distance(held), distance(free))
    beside = engine.generate([exclusive(seed, ("Cardiomegaly",), options) for seed in range(5)] + [pixels])[-1]
    first = LCOEngine(bundle, compute_batch=compute_batch).generate([pixels, latent_only])[0]
    for other in (beside, first):
        assert np.array_equal(other.image, held.image) and other.steps == held.steps
