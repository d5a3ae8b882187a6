"""training.runtime: checkpoints, RNG capture, resumable sampler, faults, monitor."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from training.runtime import (
    NonFiniteError,
    NonFiniteGuard,
    ResumableBatchSampler,
    StopRequest,
    TrainingMonitor,
    checkpoint_path,
    create_run_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    save_image_grid,
)


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.0, 0.99))
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_round_trip_restores_modules_optimisers_state_and_rng(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = save_checkpoint(
        checkpoint_path(tmp_path, 96),
        objects={"model": model, "optimizer": optimizer},
        state={"images_shown": 96, "config": {"name": "x"}},
    )
    expected = (random.random(), np.random.rand(), torch.rand(()).item())

    other_model, other_optimizer = _model_and_optimizer(7)
    checkpoint = load_checkpoint(path, objects={"model": other_model, "optimizer": other_optimizer})
    assert checkpoint.state == {"images_shown": 96, "config": {"name": "x"}}
    for a, b in zip(model.state_dict().values(), other_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), other_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_latest_checkpoint_ignores_partial_files_and_prunes(tmp_path):
    model, _ = _model_and_optimizer(0)
    assert latest_checkpoint(tmp_path) is None
    for counter in (10, 200, 30):
        save_checkpoint(checkpoint_path(tmp_path, counter), objects={"m": model}, state={}, keep_last=2)
    (tmp_path / "checkpoints" / ".checkpoint-000000009999.pt.abc.tmp").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 200)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        checkpoint_path(tmp_path, 30).name,
        checkpoint_path(tmp_path, 200).name,
    ]


class _Arbitrary:
    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_refuses_arbitrary_pickles_and_unserialisable_state(tmp_path):
    evil = tmp_path / "checkpoints" / "checkpoint-000000000001.pt"
    evil.parent.mkdir()
    torch.save({"format": "cxrsynth-checkpoint/1", "x": _Arbitrary()}, evil)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        read_checkpoint(evil)
    model, _ = _model_and_optimizer(0)
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "c.pt", objects={"m": model}, state={"bad": object()})
    assert not (tmp_path / "c.pt").exists()


def test_load_checkpoint_names_missing_objects(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path / "c.pt", objects={"model": model}, state={})
    with pytest.raises(KeyError, match="optimizer"):
        load_checkpoint(path, objects={"model": model, "optimizer": optimizer})


def test_sampler_resumes_mid_epoch_and_shards_by_rank():
    def batch_size(position: int) -> int:
        return 4 if position < 12 else 6

    straight = ResumableBatchSampler(10, batch_size, seed=5)
    batches = [next(it) for it in [iter(straight)] for _ in range(6)]
    resumed = ResumableBatchSampler(10, batch_size, seed=5, start_position=4 + 4 + 4)
    assert [next(it) for it in [iter(resumed)] for _ in range(3)] == batches[3:]
    # Every epoch is a permutation: positions 0..9 cover each item once.
    assert sorted(straight.global_indices(0, 10)) == list(range(10))
    shards = [next(iter(ResumableBatchSampler(10, 4, seed=5, rank=r, world_size=2))) for r in range(2)]
    assert shards[0] + shards[1] == batches[0]


def test_non_finite_guard_skips_then_stops():
    guard = NonFiniteGuard(max_consecutive=3, name="test")
    assert guard.check(True)
    assert not guard.check(False)
    assert guard.check(True)
    assert not guard.check(False) and not guard.check(False)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        guard.check(False)
    assert guard.total_skipped == 4


def test_stop_request_catches_sigterm_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_dir_numbering_monitor_and_grid(tmp_path):
    first = create_run_dir(tmp_path, "demo phantoms")
    second = create_run_dir(tmp_path, "demo")
    assert first.name == "00000-demo-phantoms" and second.name == "00001-demo"
    monitor = TrainingMonitor(first, total=100, progress=False)
    monitor.log({"loss": 1.5, "phase": "fade"}, step=10)
    monitor.log({"loss": 0.5, "phase": "stable"}, step=20)
    monitor.close()
    records = [json.loads(line) for line in (first / "stats.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [1.5, 0.5]
    assert list(first.glob("events.out.tfevents.*"))
    images = torch.linspace(-1, 1, 6 * 8 * 8).reshape(6, 1, 8, 8)
    grid = save_image_grid(images, first / "grids" / "g.png", columns=3)
    with Image.open(grid) as png:
        assert png.size == (24, 16) and png.mode == "L"
        assert np.asarray(png)[0, 0] == 0 and np.asarray(png)[-1, -1] == 255
