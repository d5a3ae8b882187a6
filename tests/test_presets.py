"""Presets and overrides (training/runtime/presets.py), shared by both trainers, and --dry-run.

Every classifier preset resolves to exactly the configuration recorded in
tests/data/presets/classifier_presets.json, written from the classifier presets as they stood when
they were Python (training/classifier/config.py), so a preset file that drifts from them fails here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.classifier.config import DEMO_MEMBERS, ClassifierTrainConfig, get_preset, preset_names
from training.gan.config import GanConfig
from training.runtime.presets import apply_overrides, build, parse_override, read_preset
from training.runtime.validation import ConfigError

REPO = Path(__file__).resolve().parent.parent

SNAPSHOT = json.loads((Path(__file__).parent / "data" / "presets" / "classifier_presets.json").read_text())


def _canonical(document: dict) -> str:
    """JSON text: unlike ==, it tells 10 from 10.0 and a list from a missing key."""
    return json.dumps(document, sort_keys=True)


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_every_classifier_preset_resolves_to_its_recorded_configuration(name):
    config = get_preset(name)
    assert _canonical(config.to_dict()) == _canonical(SNAPSHOT[name])
    assert config == ClassifierTrainConfig.from_dict(SNAPSHOT[name])  # tuples where the dataclasses hold tuples


def test_the_snapshot_holds_every_preset():
    assert preset_names() == sorted(SNAPSHOT)


def test_the_demo_members_differ_from_demo_only_in_stream_seed_and_width():
    """demo-2 … demo-9 extend demo: everything else is demo's, so a change to demo reaches them all."""
    demo = get_preset("demo").to_dict()
    for name in DEMO_MEMBERS[1:]:
        member = get_preset(name).to_dict()
        differs = {key for key in member if member[key] != demo[key]}
        assert differs <= {"name", "seed", "data", "model"}, (name, differs)
        assert {k for k in member["data"] if member["data"][k] != demo["data"][k]} == {"seed"}
        assert {k for k in member["model"] if member["model"][k] != demo["model"][k]} <= {"channels"}


# ------------------------------------------------------------------------------------ inheritance


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_a_preset_extends_another_tables_merge_and_values_replace(tmp_path):
    _write(tmp_path, "base", 'name = "ignored"\nlr = 0.1\ntags = [1, 2]\n[data]\nseed = 1\ncount = 5\n'
                             "[data.table]\n4 = 16\n8 = 16\n")
    _write(tmp_path, "child", 'extends = "base"\ntags = [3]\n[data]\nseed = 2\n[data.table]\n8 = 32\n')
    _write(tmp_path, "grandchild", 'extends = "child"\nlr = 0.2\n')
    assert read_preset(tmp_path, "child") == {
        "name": "child",  # never inherited
        "lr": 0.1,
        "tags": [3],  # arrays replace
        "data": {"seed": 2, "count": 5, "table": {"4": 16, "8": 32}},  # tables merge at every depth
    }
    assert read_preset(tmp_path, "grandchild")["data"]["table"] == {"4": 16, "8": 32}
    assert read_preset(tmp_path, "grandchild")["lr"] == 0.2
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    custom = _write(outside, "mine", 'extends = "base"\nlr = 0.3\n')  # by name from the preset directory
    assert read_preset(tmp_path, str(custom)) | {"data": None} == {"name": "mine", "lr": 0.3, "tags": [1, 2],
                                                                   "data": None}


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a": 'extends = "b"\n', "b": 'extends = "a"\n'}, r"extend each other in a cycle \(a -> b -> a\)"),
        ({"a": 'extends = "a"\n'}, r"cycle \(a -> a\)"),
        ({"a": 'extends = "missing"\n'}, r"no preset or TOML file 'missing'; presets: \['a'\]"),
        ({"a": "extends = 3\n"}, "extends=3 must name a preset"),
        ({"a": "lr = \n"}, r"a\.toml: "),
    ],
)
def test_a_broken_preset_is_a_clear_error(tmp_path, files, message):
    for name, text in files.items():
        _write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=message):
        read_preset(tmp_path, "a")


def test_a_classifier_preset_can_be_a_toml_file_that_extends_a_shipped_one(tmp_path):
    path = _write(tmp_path, "wide-ci", 'extends = "ci"\n[model]\nchannels = [16, 32, 64]\n')
    config = get_preset(str(path))
    assert config.name == "wide-ci" and config.model.channels == (16, 32, 64)
    assert config.data == get_preset("ci").data
    _write(tmp_path, "typo", 'extends = "ci"\nlrate = 0.1\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrate'\]"):
        get_preset(str(tmp_path / "typo.toml"))


# ------------------------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    "override, keys, value",
    [
        ("optim.lr=2e-3", ["optim", "lr"], 2e-3),
        ("optim.lr=1", ["optim", "lr"], 1.0),  # an integer where a number is wanted
        ("optim.lr=nan", ["optim", "lr"], "nan"),
        ("train.tick_images=1e4", ["train", "tick_images"], 10_000),  # whole: an integer
        ("train.tick_images=1_000", ["train", "tick_images"], 1000),
        ("train.channels_last=false", ["train", "channels_last"], False),
        ("train.compile=True", ["train", "compile"], True),
        ("train.device=cuda:1", ["train", "device"], "cuda:1"),  # bare words are strings
        ("data.phantom_prior='nih'", ["data", "phantom_prior"], "nih"),  # TOML strings too
        ("data.cache_dir=", ["data", "cache_dir"], ""),
        ("optim.betas=[0, 0.9]", ["optim", "betas"], [0.0, 0.9]),
        ("optim.betas=0.5,0.99", ["optim", "betas"], [0.5, 0.99]),
        ("schedule.batch_size.64=32", ["schedule", "batch_size", "64"], 32),  # an entry of a table
        ("schedule.batch_size={64 = 8, default = 4}", ["schedule", "batch_size"], {"64": 8, "default": 4}),
        (" network.latent_dim = 64", ["network", "latent_dim"], 64),
    ],
)
def test_an_override_is_read_as_the_type_of_its_field(override, keys, value):
    parsed_keys, parsed = parse_override(override, GanConfig)
    assert parsed_keys == keys
    if value == "nan":
        assert math.isnan(parsed)
    else:
        assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrate=1", r"unknown config field 'optim\.lrate' .*did you mean 'optim\.lr'\?"),
        ("optimizer.lr=1", r"unknown config field 'optimizer' .*did you mean 'optim'\?"),
        ("train.tick_images=many", r"train\.tick_images takes an integer"),
        ("train.tick_images=2.5", r"train\.tick_images takes an integer"),
        ("optim.lr=fast", r"optim\.lr takes a number"),
        ("train.compile=yes", r"train\.compile takes true or false"),
        ("optim.betas=0.5,high", r"optim\.betas takes numbers"),
        ("optim.betas=[0.5, 'high']", r"optim\.betas\[1\] must be a number"),
        ("schedule.batch_size.64=many", r"schedule\.batch_size\.64 takes an integer"),
        ("schedule.batch_size={64 = 'x'}", r"schedule\.batch_size\.64 must be an integer"),
        ("optim.lr.fast=1", r"optim\.lr is a value, not a table"),
        ("optim=1", r"optim is a section; set its fields, e\.g\. optim\.lr="),
        ("optim.lr", "must look like key=value"),
        ("optim..lr=1", "has an empty key"),
    ],
)
def test_a_bad_override_names_its_key(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(override, GanConfig)


def test_the_classifier_takes_the_same_grammar():
    config = get_preset("ci").override(["model.channels=4,8", "data.prior=nih", "lr=1e-3", "total_images=2e4",
                                        "data.cache_in_memory=false", "model.block_config=[1, 2]"])
    assert config.model.channels == (4, 8) and config.model.block_config == (1, 2)
    assert config.data.prior == "nih" and config.data.cache_in_memory is False
    assert config.lr == 1e-3 and config.total_images == 20_000 and isinstance(config.total_images, int)
    assert get_preset("ci").override(["model.channels="]).model.channels == ()
    with pytest.raises(ConfigError, match=r"unknown config field 'data\.train_cont' .*'data\.train_count'"):
        get_preset("ci").override(["data.train_cont=5"])
    with pytest.raises(ConfigError, match=r"model\.channels takes integers"):
        get_preset("ci").override(["model.channels=8,wide"])


def test_overrides_set_keys_a_preset_leaves_to_the_defaults():
    table = apply_overrides({"network": {"resolution": 32}}, ["schedule.batch_size.8=4", "train.seed=3"], GanConfig)
    assert table == {"network": {"resolution": 32}, "schedule": {"batch_size": {"8": 4}}, "train": {"seed": 3}}
    assert build(GanConfig, table).schedule.batch_size == {"8": 4}


# ------------------------------------------------------------------------------------ --dry-run


def _cli(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "training.cli", *arguments], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_gan_dry_run_prints_the_resolved_configuration_and_creates_nothing(tmp_path):
    completed = _cli(tmp_path, "train", "--config", "ci", "--set", "train.tick_images=1e3",
                     "--set", "schedule.batch_size.32=8", "--dry-run")
    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    assert printed["data"] == "phantoms" and printed["config"]["name"] == "ci"
    assert printed["config"]["train"]["tick_images"] == 1000
    assert printed["config"]["schedule"]["batch_size"] == {"default": 16, "32": 8}
    assert list(tmp_path.iterdir()) == []  # no runs/, no run directory
    refused = _cli(tmp_path, "train", "--config", "ci", "--set", "schedule.batch_size.8=6", "--dry-run")
    assert refused.returncode == 2 and "schedule.batch_size.8=6" in refused.stderr and not refused.stdout
    assert list(tmp_path.iterdir()) == []


def test_classifier_dry_run_prints_the_resolved_configuration_and_creates_nothing(tmp_path):
    completed = _cli(tmp_path, "classifier", "train", "--preset", "demo-3", "--set", "lr=5e-4",
                     "--set", "data.train_count=100", "--run-dir", "somewhere", "--dry-run")
    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    assert printed["lr"] == 0.0005 and printed["data"]["train_count"] == 100
    assert printed["name"] == "demo-3" and printed["model"]["channels"] == [16, 32, 48, 64]
    assert ClassifierTrainConfig.from_dict(printed) == get_preset("demo-3").override(["lr=5e-4",
                                                                                       "data.train_count=100"])
    assert list(tmp_path.iterdir()) == []
    typo = _cli(tmp_path, "classifier", "train", "--preset", "ci", "--set", "lrate=1", "--dry-run")
    assert typo.returncode == 2 and "unknown config field 'lrate'" in typo.stderr and "did you mean 'lr'" in typo.stderr


def test_classifier_resume_dry_run_shows_the_checkpoints_configuration(tmp_path, capsys):
    from training.cli import main
    from training.runtime import checkpoint_path, save_checkpoint

    run_dir = tmp_path / "run"
    config = get_preset("ci").override(["total_images=4096"])
    save_checkpoint(checkpoint_path(run_dir, 64), objects={}, state={"images_shown": 64, "config": config.to_dict()})
    before = sorted(run_dir.rglob("*"))
    assert main(["classifier", "resume", str(run_dir), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["total_images"] == 4096
    assert sorted(run_dir.rglob("*")) == before
    assert main(["classifier", "resume", str(tmp_path / "empty"), "--dry-run"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err
