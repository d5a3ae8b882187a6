"""On-manifold distillation (training/classifier/distill.py) on the ci generator and classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from service.labels import NUM_LABELS
from service.lco import LCOOptions
from tests.bundle_fixtures import run_command
from training.classifier import TrainedClassifier, get_preset
from training.classifier.distill import (
    Request,
    distill,
    lco_trajectories,
    met,
    round_requests,
    to_sphere,
    unclip,
)
from training.runtime import ConfigError

# The `ci` preset with a [distill] section cut to seconds.
TINY = ["distill.pool_images=256", "distill.pool_epochs=4", "distill.lr=1e-2", "distill.rounds=1", "distill.samples_per_request=1",
        "distill.prior_requests=1", "distill.lco_steps=4", "distill.lco_candidates=2", "distill.snapshot_every=2",
        "distill.fresh_images=32", "distill.round_epochs=2", "data.test_count=200", "bootstrap=0"]


def generate(models):
    return lambda z: models.generator(z).clamp(-1.0, 1.0)


def test_requests_cover_every_finding_no_finding_and_prior_draws():
    config = get_preset("demo-distilled").distill
    requests = round_requests(config, "nih-boosted", np.random.default_rng(0))
    assert len(requests) == NUM_LABELS + 1 + config.prior_requests
    for index, request in enumerate(requests[:NUM_LABELS]):  # one label present, the others free
        assert request.mask.sum() == 1 and request.target[index] == 1 and request.mask[index] == 1
    assert requests[NUM_LABELS].name == "No Finding" and requests[NUM_LABELS].target.sum() == 0
    assert all(r.mask.sum() == NUM_LABELS for r in requests[NUM_LABELS:])
    again = round_requests(config, "nih-boosted", np.random.default_rng(0))
    assert [r.name for r in again] == [r.name for r in requests]


def test_lco_trajectories_follow_the_stopping_rule_and_are_deterministic(ci_models):
    student = ci_models.classifier.network.eval().requires_grad_(False)
    centred = _Centred(student, ci_models.classifier.thresholds)
    target = torch.zeros(NUM_LABELS)
    target[8] = 1  # Infiltration
    request = Request("Infiltration", target, target.clone())
    options = LCOOptions(margin=0.5, fallback_margin=0.2)
    latent_dim = ci_models.generator.latent_dim
    runs = [lco_trajectories(generate(ci_models), latent_dim, centred, request, 6, 30, 4, 5, options,
                             torch.Generator().manual_seed(3)) for _ in range(2)]
    (returned, trajectory), (returned_again, trajectory_again) = runs
    assert torch.equal(returned, returned_again) and torch.equal(trajectory, trajectory_again)
    norms = returned.norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, latent_dim ** 0.5), rtol=1e-4)
    assert len(trajectory) >= 2 * len(returned)  # the starts and the returned points, at least
    with torch.no_grad():
        logits = centred(generate(ci_models)(returned))[0]
    fallback = met(logits, request.target.expand(6, -1), request.mask.expand(6, -1), options.fallback_margin,
                   options.absent_margin)
    assert fallback.float().mean() >= 0.5  # Infiltration is the ci generator's most common finding


def test_distill_brings_the_student_towards_the_teacher(ci_models, tmp_path):
    """A fresh network distilled from the (centred) ci classifier reads unseen generator images as it does."""
    from training.networks.classifier import build_classifier

    run_dir = tmp_path / "distilled"
    config = get_preset("ci").override(TINY)
    teacher = _centred_teacher(ci_models.classifier)
    probe = to_sphere(torch.randn(256, ci_models.generator.latent_dim, generator=torch.Generator().manual_seed(9)))
    with torch.no_grad():
        images = generate(ci_models)(probe)
        teacher_logits = teacher.network(images)[0]
        torch.manual_seed(config.seed)  # the student's own start, drawn by distill() below
        before = torch.nn.functional.mse_loss(build_classifier(config.model).eval()(images)[0], teacher_logits).item()
    result = distill(config, teacher, ci_models.generator, run_dir, progress=False)
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(result.network(images)[0], teacher_logits).item()
    assert after < 0.25 * before
    assert np.all(result.thresholds == 0.5)
    saved = TrainedClassifier.load(run_dir / "classifier")
    assert saved.spec == config.model and saved.mean_auroc is not None
    stages = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["stage"] for s in stages] == ["pool", "round 1"]
    assert 0.0 <= stages[1]["teacher_agreement"] <= 1.0 and stages[1]["pool"] > stages[0]["pool"]
    assert (run_dir / "roc.png").stat().st_size > 0


def test_a_clipped_student_regresses_unclipped_targets_and_reads_on_the_teachers_scale(ci_models, tmp_path):
    """output_clip: the saved student is the CNN as a one-member, one-view ensemble clipped at ±c, and
    its raw logits learnt c·atanh(t / c) of the teacher's (held within the bound)."""
    config = get_preset("ci").override([*TINY, "distill.output_clip=2"])
    teacher = _centred_teacher(ci_models.classifier)
    result = distill(config, teacher, ci_models.generator, tmp_path / "clipped", progress=False)
    saved = TrainedClassifier.load(tmp_path / "clipped" / "classifier")
    assert saved.spec.arch == "ensemble" and saved.spec.members == (config.model,)
    assert saved.spec.shifts == () and saved.spec.vote_clip == 2.0
    probe = to_sphere(torch.randn(64, ci_models.generator.latent_dim, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        images = generate(ci_models)(probe)
        raw = saved.network.members[0](images)[0]
        logits = saved.network(images)[0]
        assert torch.allclose(result.network(images)[0], logits, atol=1e-5)
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-5)
    assert logits.abs().max() < 2.0
    t = torch.tensor([-1.999, -1.8, 0.0, 1.5, 1.999])
    assert torch.allclose(2.0 * torch.tanh(unclip(t, 2.0) / 2.0), t.clamp(-1.96, 1.96), atol=1e-5)


def test_the_commands_refuse_the_wrong_kind_of_preset(ci_models, tmp_path, capsys):
    status = run_command("training.classifier.commands", [
        "classifier", "distill", str(ci_models.classifier_dir), "--generator", str(ci_models.gan_run),
        "--preset", "ci", "--run-dir", str(tmp_path / "run")])
    assert status == 2 and "has no [distill] section" in capsys.readouterr().err
    status = run_command("training.classifier.commands", [
        "classifier", "train", "--preset", "demo-distilled", "--run-dir", str(tmp_path / "train")])
    assert status == 2 and "classifier distill" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--init"):  # a start of another shape than the preset's network
        distill(get_preset("ci").override([*TINY, "model.channels=4,8,16"]), _centred_teacher(ci_models.classifier),
                ci_models.generator, tmp_path / "wrong-init", init=ci_models.classifier, progress=False)
    assert not (tmp_path / "wrong-init").exists()
    with pytest.raises(ConfigError, match="distill.samples_per_request"):
        from training.classifier.config import validate

        validate(get_preset("demo-distilled").override(["distill.samples_per_request=0"]))


# --- the ci classifier read on the teacher's centred scale (logit 0 at its threshold), as the ensemble is ---

class _Centred(torch.nn.Module):
    def __init__(self, network: torch.nn.Module, thresholds: np.ndarray):
        super().__init__()
        self.network = network
        self.register_buffer("centres", torch.logit(torch.as_tensor(thresholds, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)))

    def forward(self, image):
        logits, embedding = self.network(image)
        return logits - self.centres, embedding


def _centred_teacher(teacher: TrainedClassifier) -> TrainedClassifier:
    return TrainedClassifier(network=_Centred(teacher.network, teacher.thresholds), spec=teacher.spec,
                             thresholds=np.full(NUM_LABELS, 0.5, np.float32), metrics=teacher.metrics,
                             dataset=teacher.dataset, images_shown=teacher.images_shown, extra={"source": "ci"})
