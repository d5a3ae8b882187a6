"""LCO engine: optimiser, stopping, determinism, batching, on small real ONNX graphs.

The graphs here are a tanh-linear generator and a linear classifier written with onnx.helper, with
the LCO step's gradient written out analytically (and checked against finite differences below),
so the optimiser is tested in milliseconds. The engine on exported bundles is tested in
tests/test_service_e2e.py and by benchmarks/.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from concurrent.futures import CancelledError
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.batching import Batcher, SampleFuture
from service.counterfactual import edit_sample, plan_edit
from service.labels import LABELS, NUM_LABELS
from service.lco import (
    ADAM_BETA1,
    ADAM_BETA2,
    ADAM_EPS,
    MAX_MARGIN,
    LCOBatch,
    LCOEngine,
    LCOOptions,
    SampleRequest,
    SampleResult,
    adam_graph_bytes,
    draw_latents,
    labels_off_target,
    loss_weights,
    masked_bce,
    satisfied,
)
from training.export.onnx_graphs import build_adam_sphere_graph

LATENT = 24
SIDE = 8


def _model(nodes, inputs, outputs, initializers) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def build_graphs(seed: int = 0) -> dict[str, bytes]:
    """generator: z -> tanh(zW) as [B,1,8,8]; classifier: logits = flat(x) V + b; lco_step: both + gradient."""
    rng = np.random.default_rng(seed)
    pixels = SIDE * SIDE
    weights = {
        "W": (rng.standard_normal((LATENT, pixels)) / math.sqrt(LATENT)).astype(np.float32),
        "V": (rng.standard_normal((pixels, NUM_LABELS)) * 3 / math.sqrt(pixels)).astype(np.float32),
        "b": (rng.standard_normal(NUM_LABELS) - 1.0).astype(np.float32),
        "Wt": None,
        "Vt": None,
        "image_shape": np.array([-1, 1, SIDE, SIDE], np.int64),
        "flat_shape": np.array([-1, pixels], np.int64),
        "one": np.array(1.0, np.float32),
        "axis1": np.array([1], np.int64),
        "flat1": np.array([-1], np.int64),
    }
    weights["Wt"] = weights["W"].T.copy()
    weights["Vt"] = weights["V"].T.copy()

    def init(*names):
        return [numpy_helper.from_array(weights[n], n) for n in names]

    f = TensorProto.FLOAT
    z = helper.make_tensor_value_info("z", f, ["B", LATENT])
    image = helper.make_tensor_value_info("image", f, ["B", 1, SIDE, SIDE])
    logits = helper.make_tensor_value_info("logits", f, ["B", NUM_LABELS])
    embedding = helper.make_tensor_value_info("embedding", f, ["B", pixels])
    target = helper.make_tensor_value_info("target", f, ["B", NUM_LABELS])
    mask = helper.make_tensor_value_info("mask", f, ["B", NUM_LABELS])
    n = helper.make_node
    generator_nodes = [n("MatMul", ["z", "W"], ["a"]), n("Tanh", ["a"], ["x"]), n("Reshape", ["x", "image_shape"], ["image"])]
    classifier_nodes = [n("Reshape", ["image", "flat_shape"], ["xf"]), n("MatMul", ["xf", "V"], ["xv"]),
                        n("Add", ["xv", "b"], ["logits"])]
    step_nodes = generator_nodes + [
        n("MatMul", ["x", "V"], ["xv"]), n("Add", ["xv", "b"], ["logits"]), n("Sigmoid", ["logits"], ["probs"]),
        # masked BCE with logits, mean over constrained labels: max(l,0) - l t + log(1 + exp(-|l|))
        n("Relu", ["logits"], ["relu"]), n("Mul", ["logits", "target"], ["lt"]), n("Abs", ["logits"], ["al"]),
        n("Neg", ["al"], ["nal"]), n("Exp", ["nal"], ["e"]), n("Add", ["e", "one"], ["e1"]), n("Log", ["e1"], ["lg"]),
        n("Sub", ["relu", "lt"], ["r"]), n("Add", ["r", "lg"], ["bce"]), n("Mul", ["bce", "mask"], ["mb"]),
        n("ReduceSum", ["mb", "axis1"], ["total"], keepdims=0), n("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),
        n("Max", ["count", "one"], ["count_safe"]), n("Reshape", ["count_safe", "flat1"], ["count_flat"]),
        n("Div", ["total", "count_flat"], ["loss"]),
        # gradient: dlogits = mask (p - t) / count; dx = dlogits V^T; da = dx (1 - x^2); dz = da W^T
        n("Sub", ["probs", "target"], ["pt"]), n("Mul", ["pt", "mask"], ["ptm"]), n("Div", ["ptm", "count_safe"], ["dl"]),
        n("MatMul", ["dl", "Vt"], ["dx"]), n("Mul", ["x", "x"], ["x2"]), n("Sub", ["one", "x2"], ["dtanh"]),
        n("Mul", ["dx", "dtanh"], ["da"]), n("MatMul", ["da", "Wt"], ["grad_z"]),
    ]
    return {
        "generator": _model(generator_nodes, [z], [image], init("W", "image_shape")),
        "classifier": _model(classifier_nodes + [n("Identity", ["xf"], ["embedding"])], [image], [logits, embedding],
                             init("V", "b", "flat_shape")),
        "lco_step": _model(
            step_nodes, [z, target, mask],
            [helper.make_tensor_value_info("loss", f, ["B"]), helper.make_tensor_value_info("grad_z", f, ["B", LATENT]),
             helper.make_tensor_value_info("probs", f, ["B", NUM_LABELS]), image],
            init("W", "V", "b", "Wt", "Vt", "image_shape", "one", "axis1", "flat1"),
        ),
    }


def make_bundle(threshold: float = 0.5) -> SimpleNamespace:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {name: ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
                for name, data in build_graphs().items()}
    return SimpleNamespace(manifest=SimpleNamespace(latent_dim=LATENT), sessions=sessions,
                           thresholds=np.full(NUM_LABELS, threshold, np.float32))


@pytest.fixture(scope="module")
def bundle() -> SimpleNamespace:
    return make_bundle()


def request(positives=(), negatives=(), seed=0, **options) -> SampleRequest:
    target = np.zeros(NUM_LABELS, np.float32)
    mask = np.zeros(NUM_LABELS, np.float32)
    for i in positives:
        target[i] = mask[i] = 1.0
    for i in negatives:
        mask[i] = 1.0
    return SampleRequest(target, mask, seed, LCOOptions(**options) if options else None)


def test_analytic_step_gradient_matches_finite_differences(bundle):
    z = draw_latents(3, 4, LATENT, None)
    target = np.zeros((4, NUM_LABELS), np.float32)
    target[:, 2] = 1
    mask = np.zeros_like(target)
    mask[:, [2, 5, 9]] = 1
    step = bundle.sessions["lco_step"]
    _, grad, _, _ = step.run(None, {"z": z, "target": target, "mask": mask})
    eps = 1e-2
    numeric = np.zeros_like(z, dtype=np.float64)
    for j in range(LATENT):
        up, down = z.copy(), z.copy()
        up[:, j] += eps
        down[:, j] -= eps
        numeric[:, j] = (step.run(["loss"], {"z": up, "target": target, "mask": mask})[0].astype(np.float64)
                         - step.run(["loss"], {"z": down, "target": target, "mask": mask})[0]) / (2 * eps)
    assert np.allclose(grad, numeric, atol=2e-4, rtol=1e-2)


def test_shipped_adam_graph_is_the_builder_output():
    assert onnx.load_from_string(adam_graph_bytes()) == build_adam_sphere_graph()


def test_adam_graph_matches_numpy_adam_with_sphere_projection():
    session = ort.InferenceSession(adam_graph_bytes(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    z, grad, m, v = (rng.standard_normal((5, LATENT)).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    t = np.array([1, 2, 3, 10, 50])
    lr = np.array([0.01, 0.05, 0.1, 0.2, 1.0])
    c2 = np.sqrt(1 - ADAM_BETA2**t)
    step_size = (lr * c2 / (1 - ADAM_BETA1**t)).astype(np.float32)[:, None]
    eps_hat = (ADAM_EPS * c2).astype(np.float32)[:, None]
    radius = np.array([math.sqrt(LATENT)], np.float32)
    anchor = rng.standard_normal((5, LATENT)).astype(np.float32)
    pull = np.array([[0.0], [0.5], [0.0], [2.0], [0.1]], np.float32)
    z_next, m_next, v_next = session.run(None, {"z": z, "grad": grad, "m": m, "v": v, "step_size": step_size,
                                                "eps_hat": eps_hat, "radius": radius, "anchor": anchor,
                                                "pull": pull})
    grad = grad + pull * (z - anchor)  # the proximity term's gradient
    m_ref = ADAM_BETA1 * m + (1 - ADAM_BETA1) * grad
    v_ref = ADAM_BETA2 * v + (1 - ADAM_BETA2) * grad**2
    m_hat = m_ref / (1 - ADAM_BETA1**t)[:, None]
    v_hat = v_ref / (1 - ADAM_BETA2**t)[:, None]
    moved = z - lr[:, None] * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
    z_ref = moved * math.sqrt(LATENT) / np.linalg.norm(moved, axis=1, keepdims=True)
    assert np.allclose(m_next, m_ref, atol=1e-6) and np.allclose(v_next, v_ref, atol=1e-6)
    assert np.allclose(z_next, z_ref, atol=1e-4)
    assert np.allclose(np.linalg.norm(z_next, axis=1), math.sqrt(LATENT), rtol=1e-5)


def test_latents_come_from_the_seed_alone_and_lie_on_the_sphere():
    eight = draw_latents(42, 8, 512, None)
    assert np.allclose(np.linalg.norm(eight, axis=1), math.sqrt(512), rtol=1e-5)
    assert np.array_equal(draw_latents(42, 1, 512, None)[0], eight[0])
    assert not np.array_equal(draw_latents(43, 1, 512, None)[0], eight[0])
    truncated = draw_latents(42, 8, 512, 0.5)
    # Entries of a normal truncated at 0.5 sd are nearly uniform: no coordinate stands out after projection.
    assert np.abs(truncated).max() < 0.6 * np.abs(eight).max()


def test_options_out_of_range_say_what_to_fix():
    with pytest.raises(ValueError, match=r"steps\n  Input should be greater than or equal to 0"):
        LCOOptions(steps=-1)
    with pytest.raises(ValueError, match=r"candidates\n  Input should be less than or equal to 64"):
        LCOOptions(candidates=65)
    with pytest.raises(ValueError, match=r"lr\n  Input should be a finite number"):
        LCOOptions(lr=float("nan"))
    with pytest.raises(ValueError, match="truncation"):
        LCOOptions(truncation=0.1)
    with pytest.raises(ValueError, match="steps\n  Input should be a valid integer"):
        LCOOptions(steps="50")
    with pytest.raises(ValueError, match="unknown LCO option.*stepz; valid: steps, lr"):
        LCOOptions(stepz=3)


def test_satisfied_respects_sides_margin_and_free_labels():
    thresholds = np.full(NUM_LABELS, 0.5, np.float32)
    probs = np.full((1, NUM_LABELS), 0.5, np.float32)
    probs[0, 0], probs[0, 1] = 0.7, 0.2
    target = np.zeros((1, NUM_LABELS), np.float32)
    target[0, 0] = 1
    mask = np.zeros_like(target)
    mask[0, [0, 1]] = 1
    assert satisfied(probs, target, mask, thresholds, 0.0)[0]
    # logit(0.7) = 0.85 < margin 1.0: not yet past the threshold by the margin
    assert not satisfied(probs, target, mask, thresholds, 1.0)[0]
    target[0, 1] = 1  # label 1 at 0.2 asked present
    assert not satisfied(probs, target, mask, thresholds, 0.0)[0]


def test_a_label_requested_absent_needs_only_the_absent_margin_or_the_margin_if_smaller():
    thresholds = np.full(NUM_LABELS, 0.5, np.float32)
    probs = np.full((1, NUM_LABELS), 0.5, np.float32)
    probs[0, 0], probs[0, 1] = 0.9, 0.25  # logits 2.20 and -1.10
    target = np.zeros((1, NUM_LABELS), np.float32)
    target[0, 0] = 1
    mask = np.zeros_like(target)
    mask[0, [0, 1]] = 1
    assert not satisfied(probs, target, mask, thresholds, 1.8)[0]  # one margin for both sides
    assert satisfied(probs, target, mask, thresholds, 1.8, absent_margin=1.0)[0]
    assert not satisfied(probs, target, mask, thresholds, 1.8, absent_margin=1.2)[0]
    assert satisfied(probs, target, mask, thresholds, 0.5, absent_margin=1.2)[0]  # the margin is smaller
    assert not satisfied(probs, target, mask, thresholds, 2.5, absent_margin=0.0)[0]  # present still at 2.5
    rows = np.repeat(probs, 2, axis=0)
    np.testing.assert_array_equal(satisfied(rows, np.repeat(target, 2, 0), np.repeat(mask, 2, 0), thresholds,
                                            np.float32([1.8, 1.8]), np.float32([1.0, 1.2])), [True, False])


def test_engine_reaches_targets_and_reports_every_label(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=300, candidates=1, margin=0.5, rejection_first=False))
    samples = [request(positives=[i % NUM_LABELS], negatives=[(i + 5) % NUM_LABELS], seed=i) for i in range(20)]
    results = engine.generate(samples)
    assert [r.seed for r in results] == list(range(20))
    for sample, result in zip(samples, results):
        assert result.image.shape == (SIDE, SIDE) and result.image.dtype == np.float32
        assert -1.0 <= result.image.min() and result.image.max() <= 1.0
        assert result.probabilities.shape == (NUM_LABELS,)
        constrained = np.flatnonzero(sample.mask)
        on_side = (result.probabilities[constrained] >= 0.5) == (sample.target[constrained] > 0.5)
        assert result.satisfied == bool(on_side.all())
    assert sum(r.satisfied for r in results) >= 18
    assert any(r.steps > 0 for r in results), "candidates alone satisfied everything; the test proves nothing"


def test_optimisation_lowers_the_loss_and_the_returned_image_is_the_reported_one(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=40, candidates=1, margin=4.0))  # margin 4 keeps it stepping
    sample = request(positives=[3, 7], negatives=[1], seed=11)
    result = engine.generate([sample])[0]
    start = draw_latents(11, 1, LATENT, None)
    start_logits = engine.score(start)[1]
    assert result.steps == 40
    final_logits = np.log(result.probabilities) - np.log1p(-result.probabilities)
    before = masked_bce(start_logits, sample.target[None], sample.mask[None])[0]
    after = masked_bce(final_logits[None], sample.target[None], sample.mask[None])[0]
    assert after < 0.5 * before
    # the image returned is the one whose probabilities are reported
    logits = bundle.sessions["classifier"].run(["logits"], {"image": result.image[None, None]})[0]
    assert np.allclose(1 / (1 + np.exp(-logits[0])), result.probabilities, atol=1e-5)


def test_step_cap_and_unsatisfiable_targets_are_reported_unsatisfied():
    strict = make_bundle(threshold=0.9999)
    engine = LCOEngine(strict, LCOOptions(steps=7, candidates=2))
    result = engine.generate([request(positives=list(range(NUM_LABELS)), seed=5)])[0]
    assert result.steps == 7 and not result.satisfied
    only_candidates = engine.generate([request(positives=[0], seed=5, steps=0, candidates=4)])[0]
    assert only_candidates.steps == 0


def test_a_sample_out_of_steps_returns_the_best_point_of_its_trajectory():
    """All 14 positive at threshold 0.9 cannot be met: Adam trades labels against each other, so a
    later point can have more labels off target than an earlier one. Whatever the step cap, the
    result must be the best point so far (fewest labels off, then lowest loss), drawn again."""
    strict = make_bundle(threshold=0.9)
    sample = request(positives=list(range(NUM_LABELS)), seed=1)
    results = [LCOEngine(strict, LCOOptions(steps=cap, candidates=1, margin=0.0, lr=1.0)).generate([sample])[0]
               for cap in range(25)]

    def rank(result):
        probs = result.probabilities[None]
        off = labels_off_target(probs, sample.target[None], sample.mask[None], strict.thresholds, 0.0)[0]
        logits = np.log(probs) - np.log1p(-probs)
        return int(off), float(masked_bce(logits, sample.target[None], sample.mask[None])[0])

    ranks = [rank(r) for r in results]
    assert all(later <= earlier for earlier, later in itertools.pairwise(ranks)), ranks
    assert [r.steps for r in results] == list(range(25))
    kept = [cap for cap in range(1, 25) if np.array_equal(results[cap].image, results[cap - 1].image)]
    assert kept, "every step improved; the test never exercised returning an earlier point"
    for result in results:  # the image returned is the one whose probabilities are reported
        logits = strict.sessions["classifier"].run(["logits"], {"image": result.image[None, None]})[0]
        assert np.allclose(1 / (1 + np.exp(-logits[0])), result.probabilities, atol=1e-5)


def test_a_sample_out_of_steps_past_its_fallback_margin_returns_the_earliest_point_past_it(bundle):
    """Margin 4 is out of reach in the cap; the first point past the fallback margin is the one that a
    run stopping at that margin returns, and later, more pushed points must not replace it."""
    sample = request(positives=[3, 7], negatives=[1], seed=11)
    first = LCOEngine(bundle, LCOOptions(steps=200, candidates=1, margin=1.0)).generate([sample])[0]
    assert 0 < first.steps < 150 and first.satisfied
    settled, pushed = (LCOEngine(bundle, LCOOptions(steps=first.steps + 40, candidates=1, margin=4.0,
                                                    fallback_margin=fallback)).generate([sample])[0]
                       for fallback in (1.0, 4.0))
    assert settled.steps == pushed.steps == first.steps + 40
    assert np.array_equal(settled.image, first.image)
    np.testing.assert_array_equal(settled.probabilities, first.probabilities)
    assert not np.array_equal(pushed.image, first.image)  # without the fallback: the lowest-loss point


def test_with_patience_a_sample_past_its_fallback_margin_stops_that_many_steps_later_with_the_same_point(bundle):
    """LCOOptions.patience: margin 4 is out of reach; a run stopping at the fallback margin finds the
    earliest point past it at step s, and with patience p the sample stops at s + p and returns that
    point, as it does at its cap without patience."""
    options = {"steps": 200, "candidates": 1, "margin": 1.0, "rejection_first": False}
    sample = request(positives=[3, 7], negatives=[1], seed=11)
    first = LCOEngine(bundle, LCOOptions(**options)).generate([sample])[0]
    assert 0 < first.steps < 150
    options.update(margin=4.0, fallback_margin=1.0)
    at_cap, patient, impatient = LCOEngine(bundle).generate(
        [replace(sample, options=LCOOptions(**options, patience=patience)) for patience in (None, 7, 0)])
    assert at_cap.steps == 200 and patient.steps == first.steps + 7 and impatient.steps == first.steps
    for result in (at_cap, patient, impatient):
        assert np.array_equal(result.image, first.image)
        np.testing.assert_array_equal(result.probabilities, first.probabilities)
    # a sample that reaches its margin within its patience stops there, as without it
    options.update(margin=1.0, fallback_margin=0.2)
    reached = LCOEngine(bundle).generate([replace(sample, options=LCOOptions(**options, patience=150))])[0]
    assert reached.steps == first.steps and np.array_equal(reached.image, first.image)


def test_unconstrained_and_already_satisfied_samples_take_no_steps(bundle):
    engine = LCOEngine(bundle)
    free, easy = engine.generate([request(seed=1), request(negatives=[0], seed=2, margin=0.0, candidates=64)])
    assert free.steps == 0 and free.satisfied
    assert easy.steps == 0


def test_same_seed_gives_the_same_image_whatever_shares_the_batch(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=60, candidates=4), max_batch=64)
    probe = request(positives=[4, 9], negatives=[0], seed=1234)
    alone = engine.generate([probe])[0]
    others = [request(positives=[i % NUM_LABELS], seed=100 + i, lr=0.2) for i in range(30)]
    crowded = engine.generate(others[:11] + [probe] + others[11:])[11]
    small_batches = LCOEngine(bundle, LCOOptions(steps=60, candidates=4), max_batch=3)
    trickled = small_batches.generate(others[:7] + [probe] + others[7:])[7]
    for other in (crowded, trickled):
        assert other.seed == alone.seed and other.steps == alone.steps
        assert np.allclose(other.image, alone.image, atol=1e-6)
        assert np.allclose(other.probabilities, alone.probabilities, atol=1e-6)


def test_running_batch_lets_samples_join_between_steps(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=50, margin=4.0, candidates=1))
    batch = LCOBatch(engine)
    assert batch.add([request(positives=[1], seed=1)], ["first"]) == []
    batch.step()
    batch.step()
    batch.add([request(positives=[2], seed=2, steps=3)], ["second"])
    assert len(batch) == 2
    finished = []
    while len(batch):
        finished += [tag for tag, _ in batch.step()]
    assert finished == ["second", "first"]  # the late joiner with 3 steps leaves first


def test_warm_up_runs_one_step(bundle):
    engine = LCOEngine(bundle)
    engine.warm_up()
    assert engine.stats.step_samples >= 1 and engine.stats.forward_samples == 2


@pytest.mark.parametrize("enabled", [True, False])
def test_batcher_merges_concurrent_requests_and_matches_the_engine(bundle, enabled):
    engine = LCOEngine(bundle, LCOOptions(steps=30, candidates=2, margin=4.0))
    sizes: list[int] = []
    batcher = Batcher(engine, max_batch=64, max_wait_s=0.2, enabled=enabled, on_step=sizes.append)
    requests = [[request(positives=[c % NUM_LABELS], seed=10 * c + i) for i in range(3)] for c in range(6)]
    futures: list[list] = [[] for _ in requests]

    def client(index: int) -> None:
        futures[index] = batcher.submit(requests[index])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [[f.result(timeout=60) for f in group] for group in futures]
    batcher.close()
    reference = engine.generate([s for group in requests for s in group])
    flat = [r for group in results for r in group]
    for got, want in zip(flat, reference):
        assert got.seed == want.seed and got.steps == want.steps
        assert np.allclose(got.image, want.image, atol=1e-6)
    if enabled:
        assert max(sizes) == 18, "the six concurrent requests did not share one batch"
    else:
        assert max(sizes) == 3, "without cross-request batching each request runs alone"


@pytest.mark.parametrize("enabled", [True, False])
def test_batcher_drops_a_running_sample_whose_future_is_cancelled(bundle, enabled):
    first_step, proceed = threading.Event(), threading.Event()
    sizes: list[int] = []

    def on_step(size: int) -> None:  # hold the worker after its first step, while the test cancels
        sizes.append(size)
        first_step.set()
        proceed.wait(10)

    engine = LCOEngine(bundle, LCOOptions(steps=1000, margin=4.0, candidates=1))  # margin 4: runs to the cap
    batcher = Batcher(engine, max_wait_s=0.05, enabled=enabled, on_step=on_step)
    try:
        # every label present by 4 logits is out of reach: left alone, `drop` would step 1000 times
        keep, drop = batcher.submit([request(positives=[1], seed=1, steps=20, margin=4.0, rejection_first=False),
                                     request(positives=list(range(NUM_LABELS)), seed=2)])
        assert first_step.wait(10)
        assert drop.running()
        drop.cancel()
        proceed.set()
        with pytest.raises(CancelledError):
            drop.result(timeout=10)
        kept = keep.result(timeout=10)
        assert sizes[0] == 2 and sizes[1:] == [1] * (len(sizes) - 1), "the cancelled sample kept stepping"
        assert len(sizes) == kept.steps + 1  # its Adam steps and the evaluation that finished it
    finally:
        proceed.set()
        batcher.close()


def test_cancelling_a_request_task_marks_its_running_samples_abandoned():
    """The service awaits samples through asyncio.wrap_future; a cancelled request cancels them."""
    running = SampleFuture()
    assert running.set_running_or_notify_cancel()

    async def request_task() -> None:
        await asyncio.wrap_future(running)

    async def cancel_it() -> None:
        task = asyncio.create_task(request_task())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_it())
    assert running.abandoned and not running.done()


def test_batcher_fails_the_samples_of_a_broken_step_and_keeps_serving(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=5, margin=4.0, candidates=1))
    batcher = Batcher(engine, max_wait_s=0.0)
    bad = SampleRequest(np.zeros(3, np.float32), np.zeros(3, np.float32), 1)  # wrong label count
    with pytest.raises(ValueError):
        batcher.submit([bad])[0].result(timeout=30)
    good = batcher.submit([request(positives=[0], seed=3)])[0].result(timeout=30)
    batcher.close()
    assert good.steps == 5


@pytest.mark.parametrize("compute_batch", [1, 4])
def test_a_fixed_compute_shape_gives_each_seed_the_same_bytes_anywhere_in_any_batch(bundle, compute_batch):
    """... and whether the chunks of a pass run one after another or side by side on threads."""
    samples = [request(positives=[i % NUM_LABELS], negatives=[(i + 3) % NUM_LABELS], seed=500 + i, steps=40,
                       margin=1.0) for i in range(13)]
    engine = LCOEngine(bundle, max_batch=16, compute_batch=compute_batch, parallel_chunks=3)
    together = engine.generate(samples)
    reversed_order = engine.generate(samples[::-1])[::-1]
    trickled = LCOEngine(bundle, max_batch=3, compute_batch=compute_batch, parallel_chunks=1).generate(samples)
    for index, want in enumerate(together):
        alone = engine.generate([samples[index]])[0]
        for got in (alone, reversed_order[index], trickled[index]):
            assert got.steps == want.steps and got.satisfied == want.satisfied
            assert np.array_equal(got.image, want.image) and np.array_equal(got.probabilities, want.probabilities)


def test_graphs_run_on_whole_chunks_of_the_compute_batch(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=1, candidates=3, margin=4.0), compute_batch=4)
    assert [engine.padded_rows(n) for n in (1, 4, 5, 9)] == [4, 4, 8, 12]
    engine.generate([request(positives=[0], seed=seed) for seed in range(5)])
    # 15 candidates scored as 16 rows; 5 samples step twice (the step that hits the cap included) as 8 rows
    assert (engine.stats.forward_samples, engine.stats.step_samples) == (16, 16)
    with pytest.raises(ValueError, match="compute_batch"):
        LCOEngine(bundle, compute_batch=0)


def test_the_returned_latent_makes_the_returned_image(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=60, candidates=4, margin=1.0, rejection_first=False))
    stepped, at_once = engine.generate([request(positives=[4, 9], negatives=[0], seed=3), request(seed=4)])
    searched = LCOEngine(bundle, LCOOptions(steps=60, candidates=4, margin=1.0)).generate(
        [request(positives=[4, 9], negatives=[0], seed=3)])[0]
    assert stepped.steps > 0 and at_once.steps == 0
    assert searched.accepted_without_steps and searched.candidates_scored > 1
    for result in (stepped, at_once, searched):
        assert result.latent.shape == (LATENT,)
        assert np.allclose(np.linalg.norm(result.latent), math.sqrt(LATENT), rtol=1e-5)
        assert np.array_equal(engine.render(result.latent[None])[0], result.image)


def test_a_sample_started_from_a_latent_is_pulled_towards_it_and_judged_on_its_judged_labels(bundle):
    engine = LCOEngine(bundle, LCOOptions(steps=100, candidates=1, margin=1.0))
    original = engine.generate([request(negatives=[4], seed=8)])[0]
    target = np.zeros(NUM_LABELS, np.float32)
    target[4] = 1.0
    judged = np.zeros(NUM_LABELS, np.float32)
    judged[4] = 1.0

    def edit(pull: float) -> SampleResult:
        # label 4 flipped and judged; every other label steered to where the original had it
        soft = np.where(judged > 0, target, original.probabilities).astype(np.float32)
        return engine.generate([SampleRequest(soft, np.ones(NUM_LABELS, np.float32), 8, None,
                                              start=original.latent, pull=pull, judged=judged)])[0]

    free, pulled = edit(0.0), edit(0.1)
    for result in (free, pulled):
        assert result.satisfied and result.steps > 0  # judged on label 4 alone, which now reads present
        assert result.probabilities[4] >= 0.5 > original.probabilities[4]
    distance = [np.linalg.norm(r.latent - original.latent) for r in (free, pulled)]
    assert distance[1] < distance[0], distance
    # starting from a latent scores no candidates: the start itself is the sample's first point
    untouched = engine.generate([SampleRequest(original.probabilities, np.ones(NUM_LABELS, np.float32), 8, None,
                                               start=original.latent, judged=np.zeros(NUM_LABELS, np.float32))])[0]
    assert untouched.steps == 0 and np.array_equal(untouched.image, original.image)


def test_an_edit_weighs_the_labels_it_changes_as_much_as_all_the_others(bundle):
    """service.counterfactual.edit_sample: mask values above 1 are loss weights; the named finding's
    weight equals the 13 held labels' together, so the edit draws it in fewer steps than at weight 1."""
    engine = LCOEngine(bundle, LCOOptions(steps=100, candidates=1, margin=1.0))
    reference = request(negatives=[4], seed=8)
    original = engine.generate([reference])[0]
    spec = plan_edit(reference.target, reference.mask, [LABELS[4]], [])
    weighted = edit_sample(spec, original, 0.1, 0.0, None)
    assert weighted.mask[4] == NUM_LABELS - 1 and np.delete(weighted.mask, 4).tolist() == [1.0] * (NUM_LABELS - 1)
    unweighted = replace(weighted, mask=np.ones(NUM_LABELS, np.float32))
    heavy, light = engine.generate([weighted, unweighted])
    assert heavy.satisfied and heavy.probabilities[4] >= 0.5 > original.probabilities[4]
    assert heavy.steps < light.steps, (heavy.steps, light.steps)
    # the loss the engine ranks points by is the weighted mean
    logits = np.linspace(-3, 3, NUM_LABELS, dtype=np.float32)[None]
    per_label = masked_bce(logits, weighted.target[None], np.eye(NUM_LABELS, dtype=np.float32)[4][None])
    expected = (13 * per_label + (masked_bce(logits, weighted.target[None], np.ones((1, NUM_LABELS), np.float32))
                                  * NUM_LABELS - per_label)) / (2 * (NUM_LABELS - 1))
    assert np.allclose(masked_bce(logits, weighted.target[None], weighted.mask[None]), expected, rtol=1e-5)


def test_present_labels_weigh_as_much_as_absent_ones_unless_the_mask_weighs_them_itself():
    """LCOOptions.balance_sides: an exclusive one-finding request weighs its finding 13, two findings
    among 12 absent 6 each; one-sided, unconstrained and self-weighted masks are used as given."""
    one = request(positives=[3], negatives=[i for i in range(NUM_LABELS) if i != 3])
    weights = one.loss_weights(LCOOptions())
    assert weights[3] == NUM_LABELS - 1 and np.delete(weights, 3).tolist() == [1.0] * (NUM_LABELS - 1)
    assert one.loss_weights(LCOOptions(balance_sides=False)).tolist() == [1.0] * NUM_LABELS
    two = request(positives=[0, 9], negatives=[i for i in range(NUM_LABELS) if i not in (0, 9)])
    assert two.loss_weights(LCOOptions())[[0, 9]].tolist() == [6.0, 6.0]
    assert loss_weights(two.target, two.mask, True)[two.target < 0.5].tolist() == [1.0] * (NUM_LABELS - 2)
    for as_given in (request(positives=[2, 5]), request(negatives=list(range(NUM_LABELS))), request(),
                     replace(one, mask=np.where(one.target > 0.5, 4.0, 1.0).astype(np.float32))):
        assert as_given.loss_weights(LCOOptions()).tolist() == as_given.mask.tolist()
    assert one.mask.tolist() == [1.0] * NUM_LABELS  # the request itself is left alone


def test_a_balanced_request_steers_harder_towards_its_finding(bundle):
    """The engine steers by the balanced weights: after the same steps, an exclusive request for one
    finding has moved it further towards present than the same request with every label at weight 1."""
    options = {"steps": 10, "candidates": 1, "margin": MAX_MARGIN, "rejection_first": False}
    engine = LCOEngine(bundle)
    for seed, finding in ((5, 4), (6, 11), (7, 0)):
        sample = request(positives=[finding], negatives=[i for i in range(NUM_LABELS) if i != finding], seed=seed)
        balanced, flat = engine.generate([replace(sample, options=LCOOptions(**options)),
                                          replace(sample, options=LCOOptions(**options, balance_sides=False))])
        assert balanced.steps == flat.steps == 10
        assert balanced.probabilities[finding] > flat.probabilities[finding], (seed, finding)


def test_a_bundle_exported_before_the_image_term_refuses_an_image_pull_and_edits_without(bundle):
    """The test bundle's step graph takes (z, target, mask) only, as bundles exported before the image
    proximity term: it loads and edits with the latent pull; an image pull is a ValueError saying to
    export again."""
    engine = LCOEngine(bundle, LCOOptions(steps=20, candidates=1))
    assert not engine.image_proximity
    reference = request(negatives=[4], seed=8)
    original = engine.generate([reference])[0]
    spec = plan_edit(reference.target, reference.mask, [LABELS[4]], [])
    assert engine.generate([edit_sample(spec, original, 0.1, 0.0, None)])[0].steps >= 0
    with pytest.raises(ValueError, match="export the bundle again"):
        engine.generate([edit_sample(spec, original, 0.0, 10.0, None)])


def test_rejection_first_returns_the_first_latent_in_seed_order_that_meets_the_request(bundle):
    """Against a plain loop over draw_latents, generator and classifier; the same whatever shares the
    batch. (The `ci` bundle's version with its acceptance table: tests/test_rejection_first.py.)"""
    options = LCOOptions(steps=30, candidates=4, margin=0.5)
    engine = LCOEngine(bundle, options)
    samples = [request(positives=[i % NUM_LABELS], seed=i) for i in range(12)]
    results = engine.generate(samples)
    trickled = LCOEngine(bundle, options, max_batch=3).generate(samples[::-1])[::-1]
    positions = []
    for sample, result, other in zip(samples, results, trickled):
        budget = engine.rejection_budget(sample)
        latents = draw_latents(sample.seed, budget, LATENT, None)
        images = bundle.sessions["generator"].run(None, {"z": latents})[0]
        logits = bundle.sessions["classifier"].run(["logits"], {"image": images})[0]
        hits = np.flatnonzero(satisfied(1 / (1 + np.exp(-logits.astype(np.float64))), np.tile(sample.target, (budget, 1)),
                                        np.tile(sample.mask, (budget, 1)), bundle.thresholds, 0.5))
        assert np.array_equal(other.image, result.image) and other.steps == result.steps
        if not len(hits):
            assert not result.accepted_without_steps and result.candidates_scored == budget
            continue
        positions.append(hits[0])
        assert result.accepted_without_steps and result.steps == 0
        assert result.candidates_scored == hits[0] + 1
        assert np.allclose(result.image, np.clip(images[hits[0], 0], -1, 1), atol=1e-6)
    assert len(positions) >= 8 and max(positions) > 0, "the test cannot tell the first hit from any"
