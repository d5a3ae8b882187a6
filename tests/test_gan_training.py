"""PGGAN training: exact resume (mid fade-in), 2-process gloo data parallel, faults, signals, CLI, learning."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

from training.gan.config import GanConfig, ProgressiveSchedule, load_config
from training.gan.data import build_dataset
from training.gan.training_loop import PGGANTrainer, load_generator
from training.runtime import (
    NonFiniteError,
    init_distributed,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


REPO = Path(__file__).resolve().parent.parent

# A 16² network small enough that a few dozen steps take a second or two.
TINY = [
    "network.resolution=16",
    "network.latent_dim=16",
    "network.channel_base=64",
    "network.channel_max=8",
    "schedule.fade_images.default=64",
    "schedule.stable_images.default=64",
    "schedule.batch_size.default=8",
    "train.tick_images=32",
    "train.checkpoint_images=1000000",
    "train.grid_size=4",
    "train.cpu_threads=1",
]


def _dataset(resolution: int = 16, count: int = 40) -> TensorDataset:
    generator = torch.Generator().manual_seed(123)
    images = torch.rand(count, 1, resolution, resolution, generator=generator) * 2 - 1
    return TensorDataset(images, torch.zeros(count, 14), torch.zeros(count, 14))


def _trainer(run_dir: Path, overrides: list[str] = (), dataset=None) -> PGGANTrainer:
    config = load_config("ci", [*TINY, *overrides])
    return PGGANTrainer(
        config, dataset or _dataset(), run_dir, init_distributed("cpu"), progress=False, tensorboard=False
    )


def _assert_same_state(a: PGGANTrainer, b: PGGANTrainer) -> None:
    for name in ("G", "D", "G_ema"):
        for (key, x), y in zip(getattr(a, name).state_dict().items(), getattr(b, name).state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")
    for name in ("opt_G", "opt_D"):
        for x, y in zip(getattr(a, name).state.values(), getattr(b, name).state.values()):
            torch.testing.assert_close(x["exp_avg_sq"], y["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert (a.images_shown, a.steps, a.phase_index) == (b.images_shown, b.steps, b.phase_index)


def test_resume_mid_fade_in_equals_an_uninterrupted_run(tmp_path):
    schedule = ProgressiveSchedule(load_config("ci", TINY))
    # 4² stable: 0..64, 8² fade: 64..128. Stop at 96 images: halfway through the fade-in.
    middle, end = 96, 192
    straight = _trainer(tmp_path / "straight")
    straight.train(stop_at_images=end)

    first = _trainer(tmp_path / "split")
    result = first.train(stop_at_images=middle)
    checkpoint = read_checkpoint(result.checkpoint)
    assert checkpoint.state["phase"] == "fade" and 0 < checkpoint.state["alpha"] < 1
    assert schedule.at(middle)[0].kind == "fade"
    del first
    torch.manual_seed(999)  # the resumed process's RNGs must come from the checkpoint, not from here
    resumed = _trainer(tmp_path / "split")
    resumed.resume(latest_checkpoint(tmp_path / "split"))
    resumed.train(stop_at_images=end)
    _assert_same_state(straight, resumed)
    assert schedule.at(end)[0].resolution == 16  # the comparison spans two phase changes


def test_resume_is_exact_under_mixed_precision_with_loss_scaling(tmp_path):
    """AMP float16 + GradScaler (runs on CPU too): the scaler state is checkpointed and the GP stays finite."""
    amp = ["train.amp=on", "train.amp_dtype=float16"]
    straight = _trainer(tmp_path / "straight", amp)
    straight.train(stop_at_images=160)
    assert straight.scaler_D.is_enabled()
    first = _trainer(tmp_path / "split", amp)
    first.train(stop_at_images=96)
    checkpoint = read_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert {"scaler_G", "scaler_D"} <= set(checkpoint.objects)
    resumed = _trainer(tmp_path / "split", amp)
    resumed.resume(latest_checkpoint(tmp_path / "split"))
    resumed.train(stop_at_images=160)
    _assert_same_state(straight, resumed)
    assert resumed.scaler_D.get_scale() == straight.scaler_D.get_scale()
    assert all(torch.isfinite(p).all() for p in resumed.G.parameters())
    records = [json.loads(line) for line in (tmp_path / "straight" / "stats.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["gradient_penalty"]) for r in records[1:])


def test_non_finite_steps_are_skipped_then_stop_without_touching_checkpoints(tmp_path):
    trainer = _trainer(tmp_path, ["train.max_nonfinite_steps=3"])
    trainer.train(stop_at_images=16)
    good = latest_checkpoint(tmp_path)
    good_bytes = good.read_bytes()
    weights = {k: v.clone() for k, v in trainer.D.state_dict().items()}

    bad = _dataset()
    bad.tensors[0][:] = float("nan")
    poisoned = _trainer(tmp_path, ["train.max_nonfinite_steps=3"], dataset=bad)
    poisoned.resume(good)
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        poisoned.train()
    assert poisoned.guards["discriminator"].total_skipped == 3
    for key, value in poisoned.D.state_dict().items():
        assert torch.equal(value, weights[key]), key  # the skipped steps changed nothing
    assert list_checkpoints(tmp_path) == [good] and good.read_bytes() == good_bytes
    log = (tmp_path / "log.txt").read_text()
    assert "skipped a non-finite discriminator step" in log


DDP_WORKER = textwrap.dedent(
    """
    import sys, torch
    from torch.utils.data import TensorDataset
    from training.gan.config import load_config
    from training.gan.training_loop import PGGANTrainer
    from training.runtime import init_distributed, shutdown_distributed

    out, overrides = sys.argv[1], sys.argv[2:]
    context = init_distributed("cpu")
    images = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(123)) * 2 - 1
    data = TensorDataset(images, torch.zeros(40, 14), torch.zeros(40, 14))
    trainer = PGGANTrainer(load_config("ci", overrides), data, out, context, progress=False, tensorboard=False)
    result = trainer.train(stop_at_images=160)
    torch.save({"G": trainer.G.state_dict(), "D": trainer.D.state_dict(), "G_ema": trainer.G_ema.state_dict(),
                "backend": context.backend, "world": context.world_size, "images": result.images_shown},
               f"{out}/rank{context.rank}.pt")
    shutdown_distributed()
    """
)


def test_two_process_gloo_run_keeps_replicas_identical(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tmp_path),
        *TINY,
        "schedule.batch_size.default=16",
    ]
    completed = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["backend"] == "gloo" and r["world"] == 2 and r["images"] == 160 for r in ranks)
    for name in ("G", "D", "G_ema"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), f"{name}.{key} differs between ranks"
    # Training moved the weights away from their (shared) initialisation.
    torch.manual_seed(0)
    initial = load_config("ci", TINY)
    from training.gan.training_loop import build_networks

    generator, _ = build_networks(initial)
    assert not torch.equal(generator.state_dict()["to_gray.4.weight"], ranks[0]["G"]["to_gray.4.weight"])
    # Rank 0 wrote the checkpoint with both ranks' RNG states.
    assert len(read_checkpoint(latest_checkpoint(tmp_path)).rng) == 2


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.cli", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    # Phantoms start at 32²; a long last phase so the signal surely arrives before the end.
    settings = [*TINY, "network.resolution=32", "schedule.stable_images.32=100000", "data.phantom_count=64"]
    overrides = [arg for item in settings for arg in ("--set", item)]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.cli",
            "train",
            "--config",
            "ci",
            "--data",
            "phantoms",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            *overrides,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 120
    while not (run_dir / "stats.jsonl").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "stopped by SIGTERM" in output
    checkpoint = latest_checkpoint(run_dir)
    stopped_at = read_checkpoint(checkpoint).state["images_shown"]
    total = ProgressiveSchedule(load_config("ci", settings)).total_images
    assert 0 < stopped_at < total

    resumed = _cli("resume", str(run_dir), "--no-progress", "--stop-at", str(stopped_at + 32))
    assert resumed.returncode == 0, resumed.stderr
    assert read_checkpoint(latest_checkpoint(run_dir)).state["images_shown"] == stopped_at + 32
    assert f"from {stopped_at:,}" in (run_dir / "log.txt").read_text()


def test_cli_rejects_bad_configuration_with_a_clear_message(tmp_path):
    unknown = _cli(
        "train", "--config", "ci", "--set", "schedule.batchsize.default=4", "--run-dir", str(tmp_path)
    )
    assert unknown.returncode == 2 and "schedule.batchsize" in unknown.stderr
    preset = _cli("train", "--config", "nonexistent", "--run-dir", str(tmp_path))
    assert preset.returncode == 2 and "presets: ['ci', 'demo', 'nih-256', 'nih-sample-64', 'paper-1024']" in preset.stderr
    data = _cli("train", "--config", "ci", "--data", "cheese", "--run-dir", str(tmp_path / "x"))
    assert data.returncode == 2 and "phantoms" in data.stderr


def test_paper_schedule_matches_segal_et_al():
    config = load_config("paper-1024")
    schedule = ProgressiveSchedule(config)
    assert schedule.total_images == 14_000_000
    assert config.network.channel_table() == {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256,
        128: 128,
        256: 64,
        512: 32,
        1024: 16,
    }
    per_resolution: dict[int, dict[str, int]] = {}
    for phase in schedule.phases:
        per_resolution.setdefault(phase.resolution, {})[phase.kind] = phase.length
    assert per_resolution[4] == {"stable": 800_000}
    for resolution in (8, 16, 32, 64, 128, 256, 512):
        assert per_resolution[resolution] == {"fade": 800_000, "stable": 800_000}
    assert per_resolution[1024] == {"fade": 800_000, "stable": 1_200_000}
    assert (config.loss.gp_weight, config.loss.drift_weight, config.optim.lr, config.ema.beta) == (
        10,
        0.001,
        1e-3,
        0.999,
    )
    assert config.optim.betas == [0.0, 0.99]
    phase, alpha = schedule.at(800_000 + 200_000)
    assert (phase.resolution, phase.kind, alpha) == (8, "fade", 0.25)
    overridden = load_config("paper-1024", ["schedule.batch_size.64=8", "network.latent_dim=256"])
    assert ProgressiveSchedule(overridden).at(5_700_000)[0].batch_size == 8
    assert overridden.network.latent_dim == 256
    assert GanConfig.from_dict(config.to_dict()) == config


def _frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def _pixel_features(images: torch.Tensor) -> np.ndarray:
    """A small fixed feature extractor: 8×8 average-pooled pixels (64 statistics per image)."""
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1).double().numpy()


@pytest.mark.slow
def test_ci_preset_learns_phantoms_and_cli_samples_from_it(tmp_path):
    config = load_config("ci")
    data = build_dataset("phantoms", config, progress=False)
    trainer = PGGANTrainer(
        config,
        data,
        tmp_path,
        init_distributed("cpu"),
        data_spec="phantoms",
        progress=False,
        tensorboard=True,
    )
    real = _pixel_features(torch.stack([data[i][0] for i in range(len(data))]))
    latents = torch.randn(512, config.network.latent_dim, generator=torch.Generator().manual_seed(42))

    def fake_features() -> np.ndarray:
        with torch.no_grad():
            return _pixel_features(trainer.G_ema(latents).clamp(-1, 1))

    before = _frechet_distance(fake_features(), real)
    result = trainer.train()
    after = _frechet_distance(fake_features(), real)
    assert result.finished
    print(f"pixel-statistics Fréchet distance, EMA samples vs phantoms: {before:.3f} -> {after:.3f}")
    assert after <= 0.5 * before, f"Fréchet distance {before:.3f} -> {after:.3f}"

    records = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert records[-1]["images_shown"] == ProgressiveSchedule(config).total_images
    assert {r["resolution"] for r in records} == {4, 8, 16, 32}
    assert len(list((tmp_path / "grids").glob("fakes-*.png"))) == len(records) + 1
    assert list(tmp_path.glob("events.out.tfevents.*"))

    checkpoint = latest_checkpoint(tmp_path)
    generator = load_generator(checkpoint)
    assert torch.allclose(generator(latents[:4]), trainer.G_ema(latents[:4]))
    grid, out = tmp_path / "grid.png", tmp_path / "samples"
    sampled = _cli(
        "sample", str(checkpoint), "--grid", str(grid), "--count", "3", "--out", str(out), "--bits", "16"
    )
    assert sampled.returncode == 0, sampled.stderr
    with Image.open(grid) as png:
        assert png.size == (64, 64)  # 3 images -> 2×2 grid of 32²
    files = sorted(out.glob("*.png"))
    assert len(files) == 3
    with Image.open(files[0]) as png:
        assert png.size == (32, 32) and np.asarray(png).dtype == np.uint16


def test_trains_from_an_image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(folder / f"{index}.png")
    config = load_config("ci", [*TINY, "network.resolution=32"])
    data = build_dataset(f"folder:{folder}", config)
    image, labels, mask = data[0]
    assert labels.shape == (14,)
    assert image.shape == (1, 32, 32) and -1 <= image.min() and image.max() <= 1 and mask.sum() == 0
    trainer = PGGANTrainer(
        config,
        data,
        tmp_path / "run",
        init_distributed("cpu"),
        data_spec=f"folder:{folder}",
        progress=False,
        tensorboard=False,
    )
    result = trainer.train(stop_at_images=32)
    assert read_checkpoint(result.checkpoint).state["data"] == f"folder:{folder}"
