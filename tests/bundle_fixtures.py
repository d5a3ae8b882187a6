"""Session fixtures with really trained networks and a really exported bundle (register with
``pytest_plugins = ["tests.bundle_fixtures"]`` in conftest.py).

- ``ci_models``: the `ci` PGGAN (32², the GAN's own preset) and the `ci` classifier, trained once.
- ``ci_bundle``: those two exported by the ``export`` command into a bundle directory (read-only by
  convention: tests that damage a bundle copy it first, see ``copy_bundle``).
- ``ci_auditor`` / ``ci_auditor_bundle``: a short `auditor-ci` run (another network, seed and phantom
  stream than `ci`'s), and the `ci` networks exported with it as the bundle's ``auditor.onnx``.
- ``ci_steered_bundle``: the `ci` networks exported with `auditor-ci` as LCO's steering network
  (``export --steering``): steered by one network, accepted by another.

Training and export happen once per test run, whichever test asks first; under pytest-xdist the
workers share what the first of them built (``built_once``).
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from training.classifier import TrainedClassifier, get_preset, train_classifier


@dataclass
class CIModels:
    gan_run: Path
    gan_checkpoint: Path
    classifier_dir: Path
    generator: torch.nn.Module
    classifier: TrainedClassifier


def train_ci_gan(run_dir: Path) -> Path:
    """Train the GAN's `ci` preset on phantoms; return its final checkpoint."""
    from training.gan.config import load_config
    from training.gan.data import build_dataset
    from training.gan.training_loop import PGGANTrainer
    from training.runtime import init_distributed

    config = load_config("ci")
    data = build_dataset("phantoms", config, progress=False)
    trainer = PGGANTrainer(config, data, run_dir, init_distributed("cpu"), data_spec="phantoms", progress=False,
                           tensorboard=False)
    result = trainer.train()
    assert result.finished and result.checkpoint is not None
    return result.checkpoint


def train_preset(preset: str, run_dir: Path) -> TrainedClassifier:
    result = train_classifier(get_preset(preset), run_dir, progress=False, tensorboard=False)
    assert result is not None
    return result


def run_command(module: str, argv: list[str]) -> int:
    """Run one ``training.cli`` command module's handler, as ``python -m training.cli`` would."""
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(module).register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


def copy_bundle(bundle: Path, destination: Path) -> Path:
    shutil.copytree(bundle, destination)
    return destination


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The directory ``name`` that ``build`` fills, built once per test run.

    Under pytest-xdist every worker has a temporary root of its own below one shared parent: the
    directory lives in that parent, the first worker to ask builds it while the others wait on a lock,
    and every later ask finds it built. A build that fails leaves no marker and is tried again. It
    runs torch on one thread: the weights a run learns depend on how its sums were split over threads,
    and the images tests/test_reproducibility.py pins must not depend on the machine's core count.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    directory, built = base / name, base / f"{name}.built"
    with FileLock(str(base / f"{name}.lock")):
        if not built.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                build(directory)
            finally:
                torch.set_num_threads(threads)
            built.touch()
    return directory


@pytest.fixture(scope="session")
def ci_models(tmp_path_factory) -> CIModels:
    from training.gan.training_loop import load_generator

    def build(root: Path) -> None:
        (root / "checkpoint").write_text(str(train_ci_gan(root / "gan")))
        train_preset("ci", root / "classifier")

    root = built_once(tmp_path_factory, "ci-models", build)
    checkpoint = Path((root / "checkpoint").read_text())
    classifier_dir = root / "classifier" / "classifier"
    return CIModels(gan_run=root / "gan", gan_checkpoint=checkpoint, classifier_dir=classifier_dir,
                    generator=load_generator(checkpoint), classifier=TrainedClassifier.load(classifier_dir))


def exported_ci_bundle(tmp_path_factory, ci_models: CIModels, directory: str, name: str, *options: str) -> Path:
    """The `ci` GAN run and classifier written by the ``export`` command as bundle ``name`` (with the
    command's further ``options``), once per test run in ``directory``."""
    def build(root: Path) -> None:
        assert run_command("training.export.commands", [
            "export", "--generator", str(ci_models.gan_run), "--classifier", str(ci_models.classifier_dir),
            *options, "--out", str(root / name), "--name", name,
        ]) == 0

    return built_once(tmp_path_factory, directory, build) / name


@pytest.fixture(scope="session")
def ci_bundle(ci_models, tmp_path_factory) -> Path:
    """The `ci` bundle, written by the export command from the GAN run and the classifier."""
    return exported_ci_bundle(tmp_path_factory, ci_models, "ci-bundle", "cxrsynth-ci")


@pytest.fixture(scope="session")
def ci_auditor(tmp_path_factory) -> Path:
    """The run directory of the `auditor-ci` preset cut to a third of its images (seconds of CPU), trained
    once: a weak auditor, which rejects enough of the ci bundle's LCO images for retries to happen."""
    config = get_preset("auditor-ci").override(["total_images=4000", "checkpoint_every=4000", "tick_images=2000",
                                                "data.train_count=1000", "data.test_count=300"])

    def build(root: Path) -> None:
        assert train_classifier(config, root / "run", progress=False, tensorboard=False) is not None

    return built_once(tmp_path_factory, "ci-auditor", build) / "run"


@pytest.fixture(scope="session")
def ci_auditor_bundle(ci_models, ci_auditor, tmp_path_factory) -> Path:
    """The `ci` bundle with `auditor-ci` as its auditor, written by ``export --auditor``."""
    return exported_ci_bundle(tmp_path_factory, ci_models, "ci-auditor-bundle", "cxrsynth-ci-audited",
                              "--auditor", str(ci_auditor))


@pytest.fixture(scope="session")
def ci_steered_bundle(ci_models, ci_auditor, tmp_path_factory) -> Path:
    """The `ci` bundle whose ``lco_step.onnx`` steers by `auditor-ci` (``export --steering``) while the
    `ci` classifier decides when an image meets its request."""
    return exported_ci_bundle(tmp_path_factory, ci_models, "ci-steered-bundle", "cxrsynth-ci-steered",
                              "--steering", str(ci_auditor))
