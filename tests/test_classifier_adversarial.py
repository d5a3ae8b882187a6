"""Adversarial (robust) classifier training: PGD within its budget, the trainer's use of it, its bounds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from training import cli
from training.classifier import get_preset, train_classifier
from training.classifier.adversarial import pgd_perturb
from training.classifier.config import AdversarialConfig, validate
from training.classifier.trainer import Splits, masked_weighted_bce, materialize
from training.data import PhantomDataset
from training.networks.classifier import ClassifierSpec, build_classifier
from training.runtime.validation import ConfigError


@pytest.fixture(scope="module")
def batch():
    """A tiny CNN fitted to 16 phantoms at 32² (a network with a loss worth raising), and the batch."""
    torch.manual_seed(0)
    network = build_classifier(ClassifierSpec(arch="small_cnn", input_size=32, channels=(4, 8)))
    data = materialize(PhantomDataset(16, 32, seed=11, prior="balanced"), 0, "phantoms")
    images, labels, mask = data.images.float(), data.labels, data.mask
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        masked_weighted_bce(network(images)[0], labels, mask, torch.ones(labels.shape[1])).backward()
        optimizer.step()
    network.zero_grad(set_to_none=True)
    return network.eval(), images, labels, mask


def _loss(network, labels, mask):
    return lambda images: masked_weighted_bce(network(images)[0], labels, mask, torch.ones(labels.shape[1]))


@pytest.mark.parametrize(("norm", "epsilon"), [("l2", 1.0), ("linf", 0.05)])
def test_pgd_stays_within_its_budget_and_raises_the_loss(batch, norm, epsilon):
    network, images, labels, mask = batch
    loss_of = _loss(network, labels, mask)
    config = AdversarialConfig(norm=norm, epsilon=epsilon, steps=4)
    adversarial = pgd_perturb(images, loss_of, config, generator=torch.Generator().manual_seed(0))
    delta = (adversarial - images).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert adversarial.shape == images.shape and not adversarial.requires_grad
    assert torch.all(size <= epsilon * (1 + 1e-5)) and torch.all(size > 0.5 * epsilon)
    assert adversarial.min() >= -1.0 and adversarial.max() <= 1.0
    with torch.no_grad():
        clean, attacked = float(loss_of(images)), float(loss_of(adversarial))
    # a random point of the same ball raises the loss far less than PGD's ascent
    noise = pgd_perturb(images, loss_of, replace(config, steps=1, step_size=1e-9),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        random = float(loss_of(noise))
    print(f"{norm} ε={epsilon}: loss clean {clean:.4f}, random start {random:.4f}, PGD {attacked:.4f}")
    assert attacked > clean + 0.01 and attacked > random
    assert all(p.grad is None for p in network.parameters())


def test_robust_training_steps_on_the_perturbed_batch(tmp_path):
    """With [adversarial] set the trainer's loss is the PGD batch's: higher than the clean batch's."""
    parts = [materialize(PhantomDataset(count, 32, seed=seed, prior="balanced"), 0, "phantoms")
             for count, seed in ((128, 21), (64, 22), (64, 23))]
    splits = Splits(*parts, description="phantoms-test")
    base = ["total_images=128", "warmup_images=64", "bootstrap=0", "model.channels=4,8", "tick_images=64"]
    losses = {}
    for name, extra in (("clean", []), ("robust", ["adversarial.norm=linf", "adversarial.epsilon=0.1"])):
        config = get_preset("ci").override(base + extra)
        result = train_classifier(config, tmp_path / name, progress=False, tensorboard=False, splits=splits)
        assert result.images_shown == 128
        losses[name] = [float(line.split('"loss": ')[1].split(",")[0])
                        for line in (tmp_path / name / "stats.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses["robust"][0] > losses["clean"][0]  # same start, same batches: only PGD differs


@pytest.mark.parametrize(("override", "message"), [
    ("adversarial.epsilon=0.5", "adversarial.epsilon=0.5 is past the L∞ budget of 0.25"),
    ("adversarial.steps=0", "adversarial.steps=0 must be an integer from 1 to 20"),
    ("adversarial.step_size=0.2", "adversarial.step_size=0.2 must be at most adversarial.epsilon=0.1"),
    ("adversarial.norm=l1", "adversarial.norm='l1' must be one of none, l2, linf"),
])
def test_adversarial_config_out_of_bounds_is_refused_with_the_fix(override, message):
    config = get_preset("ci").override(["adversarial.norm=linf", "adversarial.epsilon=0.1", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


def test_l2_budget_scales_with_the_image_side_and_the_cli_names_it(capsys):
    validate(get_preset("demo-robust"))
    assert get_preset("demo-robust").adversarial.enabled and not get_preset("demo").adversarial.enabled
    assert cli.main(["classifier", "train", "--preset", "demo-robust", "--set", "adversarial.norm=l2",
                     "--set", "adversarial.epsilon=20", "--dry-run"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and len(printed.err.splitlines()) == 1
    assert "adversarial.epsilon=20.0 is past the L2 budget (0.25 × input side 64) of 16" in printed.err
