"""Start-up validation: a configuration that cannot run is refused before any work, naming its key.

GAN (training/gan/config.py) and classifier (training/classifier/config.py) configurations are
checked against the world size torchrun will use, the networks' real constraints (the minibatch-stddev
grouping rule, the classifiers' pooling) and the data, with exit status 2 from the commands.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.classifier import get_preset
from training.classifier.config import preset_names
from training.classifier.config import problems as classifier_problems
from training.cli import main
from training.gan.config import CONFIG_DIR, ConfigError, GanConfig, load_config
from training.gan.training_loop import PGGANTrainer
from training.networks.classifier import ClassifierSpec, build_classifier, feature_size
from training.networks.pggan import minibatch_stddev
from training.runtime import checkpoint_path, init_distributed, list_checkpoints, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
GAN_PRESETS = sorted(path.stem for path in CONFIG_DIR.glob("*.toml"))


@pytest.fixture(autouse=True)
def _alone(monkeypatch):
    """Every test decides its own world size; none inherits a torchrun environment."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# ------------------------------------------------------------------------------------ GAN


def test_the_reported_case_exits_2_before_training_anything(tmp_path):
    """`train --config ci --data phantoms --set schedule.batch_size.8=6` used to train all of 4² first."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    completed = subprocess.run(
        [sys.executable, "-m", "training.cli", "train", "--config", "ci", "--data", "phantoms",
         "--set", "schedule.batch_size.8=6"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "schedule.batch_size.8=6" in completed.stderr
    assert "minibatch-stddev group size 4" in completed.stderr and "use a multiple of 4" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "runs").exists()  # no run directory, so no checkpoint, grid or stats either


@pytest.mark.parametrize("preset", GAN_PRESETS)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_every_shipped_preset_validates_clean(preset, world_size):
    config = load_config(preset, world_size=world_size)
    assert GanConfig.from_dict(config.to_dict(), world_size=world_size) == config


@pytest.mark.parametrize(
    "override, key",
    [
        ("schedule.batch_size.8=6", "schedule.batch_size.8=6"),
        ("schedule.batch_size.default=10", "schedule.batch_size.default=10"),
        ("schedule.batch_size.default=0", "schedule.batch_size.default=0"),
        ("schedule.batch_size.12=8", "schedule.batch_size.12"),
        ("schedule.batch_size.64=8", "schedule.batch_size.64"),  # ci stops at 32²: it would change nothing
        ("schedule.fade_images.4=100", "schedule.fade_images.4"),  # the start resolution does not fade in
        ("schedule.stable_images.32=0", "schedule.stable_images.32=0"),
        ("schedule.stable_images.default=-1", "schedule.stable_images.default=-1"),
        ("schedule.start_resolution=64", "schedule.start_resolution=64"),
        ("schedule.start_resolution=12", "schedule.start_resolution=12"),
        ("network.resolution=48", "network.resolution=48"),
        ("network.resolution=2", "network.resolution=2"),
        ("network.latent_dim=0", "network.latent_dim=0"),
        ("network.channel_base=0", "network.channel_base=0"),
        ("network.channel_max=-8", "network.channel_max=-8"),
        ("network.mbstd_group_size=0", "network.mbstd_group_size=0"),
        ("network.channels.8=0", "network.channels.8=0"),
        ("network.channels.64=16", "network.channels.64"),
        ("network.channels.default=16", "network.channels.default"),
        ("loss.gp_weight=0", "loss.gp_weight=0"),
        ("loss.gp_weight=nan", "loss.gp_weight=nan"),
        ("loss.gp_target=-1", "loss.gp_target=-1"),
        ("loss.drift_weight=-0.001", "loss.drift_weight=-0.001"),
        ("optim.lr=0", "optim.lr=0"),
        ("optim.lr=-1e-3", "optim.lr=-0.001"),
        ("optim.lr=inf", "optim.lr=inf"),
        ("optim.betas=[0.0, 1.0]", "optim.betas[1]=1.0"),
        ("optim.betas=[0.9]", "optim.betas="),
        ("optim.eps=0", "optim.eps=0"),
        ("ema.beta=1.0", "ema.beta=1.0"),
        ("ema.beta=-0.5", "ema.beta=-0.5"),
        ("data.phantom_count=0", "data.phantom_count=0"),
        ("data.phantom_prior='uniform'", "data.phantom_prior='uniform'"),
        ("data.phantom_seed=-1", "data.phantom_seed=-1"),
        ("data.num_workers=-1", "data.num_workers=-1"),
        ("train.seed=-1", "train.seed=-1"),
        ("train.tick_images=0", "train.tick_images=0"),
        ("train.checkpoint_images=0", "train.checkpoint_images=0"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints=0"),
        ("train.grid_size=0", "train.grid_size=0"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps=0"),
        ("train.amp=maybe", "train.amp='maybe'"),
        ("train.amp_dtype=float8", "train.amp_dtype='float8'"),
        ("train.device=gpu", "train.device='gpu'"),
        ("train.cpu_threads=-1", "train.cpu_threads=-1"),
    ],
)
def test_a_value_that_cannot_run_is_refused_by_its_key(override, key):
    with pytest.raises(ConfigError) as raised:
        load_config("ci", [override], world_size=1)
    assert len(raised.value.problems) == 1, raised.value.problems
    assert raised.value.problems[0].startswith(key), raised.value.problems


@pytest.mark.parametrize(
    "overrides, world_size, key",
    [
        (["schedule.batch_size.default=16"], 3, "schedule.batch_size.default=16 is not divisible by world size 3"),
        (["schedule.batch_size.8=2"], 4, "schedule.batch_size.8=2 is not divisible by world size 4"),
        # Divisible by the world, but 6 per rank is not a multiple of the group of 4.
        (["schedule.batch_size.8=24"], 4, "schedule.batch_size.8=24 gives per-rank batches of 6 (world size 4)"),
        (["network.mbstd_group_size=5"], 1, "schedule.batch_size.default=16 gives per-rank batches of 16"),
    ],
)
def test_batches_are_checked_against_the_world_size(overrides, world_size, key):
    with pytest.raises(ConfigError) as raised:
        load_config("ci", overrides, world_size=world_size)
    assert [p for p in raised.value.problems if p.startswith(key)], raised.value.problems
    load_config("ci", overrides)  # without a world size, only the launch-independent checks run


@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("batch", range(1, 13))
def test_the_batch_rule_is_the_minibatch_stddev_layers_own(batch, group_size):
    """Validation accepts a per-rank batch exactly when the discriminator's layer can group it."""
    try:
        minibatch_stddev(torch.zeros(batch, 2, 4, 4), group_size)
        layer_runs = True
    except ValueError:
        layer_runs = False
    overrides = [
        f"schedule.batch_size.8={batch}",
        f"network.mbstd_group_size={group_size}",
        f"schedule.batch_size.default={group_size}",  # every other resolution: one group per rank
    ]
    try:
        load_config("ci", overrides, world_size=1)
        accepted = True
    except ConfigError as error:
        assert all(p.startswith("schedule.batch_size.8=") for p in error.problems), error.problems
        accepted = False
    assert accepted == layer_runs


def test_every_problem_is_reported_at_once():
    overrides = ["schedule.batch_size.8=6", "optim.lr=0", "ema.beta=2.0", "train.tick_images=0"]
    with pytest.raises(ConfigError) as raised:
        load_config("ci", overrides, world_size=1)
    message = str(raised.value)
    assert message.startswith("4 problems in the configuration:")
    for key in ("schedule.batch_size.8=6", "optim.lr=0", "ema.beta=2.0", "train.tick_images=0"):
        assert f"  - {key}" in message


def test_a_preset_can_shrink_but_an_override_that_changes_nothing_is_refused():
    # ci's stable_images.32 is left over when the network stops at 16²: it is the preset's, not a mistake.
    assert load_config("ci", ["network.resolution=16"], world_size=1).network.resolution == 16
    with pytest.raises(ConfigError, match=r"schedule\.stable_images\.32 \(--set\)"):
        load_config("ci", ["network.resolution=16", "schedule.stable_images.32=100"], world_size=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_must_exist_only_when_a_run_starts():
    with pytest.raises(ConfigError, match=r"train\.device='cuda' but torch sees no CUDA device"):
        load_config("ci", ["train.device=cuda"], world_size=1)
    assert load_config("ci", ["train.device=cuda"]).train.device == "cuda"  # e.g. read for export


def test_the_trainer_refuses_a_configuration_its_world_cannot_run(tmp_path):
    config = load_config("ci", ["schedule.batch_size.8=6"])  # no world size: loads
    with pytest.raises(ConfigError, match=r"schedule\.batch_size\.8=6"):
        PGGANTrainer(config, [], tmp_path / "run", init_distributed("cpu"), progress=False, tensorboard=False)
    assert not (tmp_path / "run").exists()


def _fake_gan_run(run_dir: Path, overrides: list[str] = ()) -> Path:
    """A run directory whose checkpoint holds only the state `resume` reads before any work."""
    config = load_config("ci", overrides)
    state = {"kind": "pggan", "config": config.to_dict(), "data": "phantoms", "images_shown": 16, "world_size": 1}
    return save_checkpoint(checkpoint_path(run_dir, 16), objects={}, state=state)


@pytest.mark.parametrize(
    "extra, environment, key",
    [
        (["--set", "schedule.batch_size.8=6"], {}, "schedule.batch_size.8=6"),
        ([], {"WORLD_SIZE": "3"}, "schedule.batch_size.default=16 is not divisible by world size 3"),
        ([], {"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        (["--set", "network.latent_dim=64"], {}, "network.latent_dim=64 differs from the checkpoint's 32"),
        (["--set", "network.channel_max=16"], {}, "network.channels.4=16"),
        (["--data", "nih:/no/such/folder"], {}, "--data nih:/no/such/folder"),
        (["--stop-at", "0"], {}, "--stop-at=0"),
    ],
)
def test_resume_checks_before_any_work(tmp_path, monkeypatch, capsys, extra, environment, key):
    checkpoint = _fake_gan_run(tmp_path / "run")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["resume", str(tmp_path / "run"), "--no-progress", *extra]) == 2
    stderr = capsys.readouterr().err
    assert key in stderr, stderr
    assert list_checkpoints(tmp_path / "run") == [checkpoint]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


@pytest.mark.parametrize(
    "arguments, key",
    [
        (["--data", "cheese"], "--data 'cheese'"),
        (["--data", "folder:/no/such/folder"], "--data folder:/no/such/folder"),
        (["--data", "phantoms", "--set", "network.resolution=16"], "network.resolution=16 with --data phantoms"),
    ],
)
def test_train_checks_the_data_before_any_work(tmp_path, capsys, arguments, key):
    assert main(["train", "--config", "ci", "--runs", str(tmp_path / "runs"), "--no-progress", *arguments]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------ classifier


@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_classifier_preset_validates_clean(preset, world_size, tmp_path):
    config = get_preset(preset)
    if config.data.kind != "phantoms":
        config = config.override([f"data.root={tmp_path}"])  # real data sets are named on the command line
    assert classifier_problems(config, world_size) == []


@pytest.mark.parametrize(
    "preset, override, key",
    [
        ("ci", "batch_size=0", "batch_size=0"),
        ("ci", "total_images=0", "total_images=0"),
        ("ci", "lr=0", "lr=0.0"),
        ("ci", "lr=-1e-3", "lr=-0.001"),
        ("ci", "lr=nan", "lr=nan"),
        ("ci", "weight_decay=-1", "weight_decay=-1.0"),
        ("ci", "warmup_images=-1", "warmup_images=-1"),
        ("ci", "pos_weight_max=0.5", "pos_weight_max=0.5"),
        ("ci", "checkpoint_every=0", "checkpoint_every=0"),
        ("ci", "tick_images=0", "tick_images=0"),
        ("ci", "bootstrap=-1", "bootstrap=-1"),
        ("ci", "workers=-1", "workers=-1"),
        ("ci", "seed=-1", "seed=-1"),
        ("ci", "device=gpu", "device='gpu'"),
        ("ci", "data.kind=folder", "data.kind='folder' has no labels"),
        ("ci", "data.kind=mnist", "data.kind='mnist'"),
        ("ci", "data.kind=nih", "data.root=''"),
        ("ci", "data.resolution=48", "data.resolution=48 must be a power of two"),
        ("ci", "data.resolution=16", "data.resolution=16"),
        ("ci", "data.prior=uniform", "data.prior='uniform'"),
        ("ci", "data.seed=-1", "data.seed=-1"),
        ("ci", "data.train_count=0", "data.train_count=0"),
        ("ci", "data.val_count=0", "data.val_count=0"),
        ("ci", "data.test_count=0", "data.test_count=0"),
        ("ci", "data.uncertain=maybe", "data.uncertain='maybe'"),
        ("ci", "model.arch=ensemble", "model.arch='ensemble'"),
        ("ci", "model.arch=resnet", "model.arch='resnet'"),
        ("ci", "model.num_labels=13", "model.num_labels=13"),
        ("ci", "model.input_size=4", "model.input_size=4 is too small for this small_cnn"),
        ("ci", "model.channels=", "model.channels="),
        ("ci", "model.channels=0,8", "model.channels=0,8"),
        ("ci", "model.dropout=1.0", "model.dropout=1.0"),
        ("auditor-ci", "model.stem=tiny", "model.stem='tiny'"),
        ("auditor-ci", "model.growth_rate=0", "model.growth_rate=0"),
        ("auditor-ci", "model.block_config=", "model.block_config="),
        ("auditor-ci", "model.input_size=8", "model.input_size=8 is too small for this densenet"),
    ],
)
def test_a_classifier_value_that_cannot_train_is_refused_by_its_key(preset, override, key):
    found = classifier_problems(get_preset(preset).override([override]), 1)
    assert len(found) == 1 and found[0].startswith(key), found


def test_classifier_batch_is_checked_against_the_world_size(tmp_path):
    config = get_preset("ci")
    assert classifier_problems(config, 3) == [
        "batch_size=64 is not divisible by world size 3 (WORLD_SIZE, one process per rank); use a multiple of 3"
    ]
    missing = config.override(["data.kind=nih", "data.root=/no/such/folder"])
    assert classifier_problems(missing, 1) == ["data.root='/no/such/folder' is not a directory"]
    assert classifier_problems(missing, None) == []  # reading a checkpoint's config elsewhere


def test_a_densenet_with_one_image_per_rank_and_a_1x1_map_is_refused():
    """BatchNorm cannot train on one value per channel: the check matches what torch does."""
    config = get_preset("auditor-ci").override(["model.input_size=16", "batch_size=2"])
    assert feature_size(config.model) == 1
    network = build_classifier(config.model).train()
    network(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        network(torch.zeros(1, 1, 16, 16))
    assert classifier_problems(config, 1) == []
    (found,) = classifier_problems(config, 2)
    assert found.startswith("batch_size=2 leaves one image per rank (world size 2)")


@pytest.mark.parametrize(
    "spec",
    [
        ClassifierSpec(arch="small_cnn", channels=(4, 8, 8)),
        ClassifierSpec(arch="densenet", block_config=(1, 1, 1), growth_rate=4, init_features=8, bn_size=1),
        ClassifierSpec(arch="densenet", block_config=(1, 1), growth_rate=4, init_features=8, bn_size=1,
                       stem="compact"),
    ],
)  # fmt: skip
def test_feature_size_follows_the_real_networks(spec):
    for size in range(1, 26):
        sized = dataclasses.replace(spec, input_size=size)
        network = build_classifier(sized).eval()
        expected = feature_size(sized)
        if expected == 0:
            with pytest.raises(RuntimeError):
                network.features(torch.zeros(1, 1, size, size))
        else:
            assert network.features(torch.zeros(1, 1, size, size)).shape[-1] == expected, size


def test_classifier_commands_refuse_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["classifier", "train", "--preset", "ci", "--set", "lr=0", "--set", "batch_size=0",
                 "--run-dir", str(run_dir), "--no-progress"])  # fmt: skip
    assert code == 2
    stderr = capsys.readouterr().err
    assert "2 problems" in stderr and "  - lr=0.0" in stderr and "  - batch_size=0" in stderr
    assert not run_dir.exists()
    # resume reads the configuration from the checkpoint and checks it the same way
    bad = get_preset("ci").override(["tick_images=0"]).to_dict()
    checkpoint = save_checkpoint(checkpoint_path(run_dir, 64), objects={}, state={"images_shown": 64, "config": bad})
    assert main(["classifier", "resume", str(run_dir), "--no-progress"]) == 2
    assert "tick_images=0" in capsys.readouterr().err
    assert list_checkpoints(run_dir) == [checkpoint]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints"]


# ------------------------------------------------------------------------------------ the CLI
def test_each_command_module_registers_exactly_the_commands_the_cli_lists_for_it():
    """training.cli imports only the module of the command about to run, found by COMMAND_MODULES."""
    import argparse
    import importlib

    from training.cli import COMMAND_MODULES, build_parser

    for name, commands in COMMAND_MODULES.items():
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers(dest="command")
        importlib.import_module(name).register(subparsers)
        assert tuple(subparsers.choices) == commands, name
    every = build_parser()._subparsers._group_actions[0].choices
    assert list(every) == [command for commands in COMMAND_MODULES.values() for command in commands]
    assert list(build_parser("export")._subparsers._group_actions[0].choices) == ["export", "export-auditor", "export-step"]


def test_a_command_imports_only_its_own_module():
    probe = ("import sys\nfrom training.cli import build_parser\nbuild_parser('convert')\n"
             "print(sorted(m for m in ('onnx', 'training.gan.commands', 'training.export.commands', "
             "'training.evaluate.commands', 'training.data.commands') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert loaded.stdout.strip() == "['training.data.commands']", loaded.stdout
