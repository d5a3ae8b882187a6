"""Two-process (gloo) data-parallel classifier training: both replicas end with identical weights.

Run as a script under torchrun this file is the worker; under pytest it launches torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _worker(run_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from training.classifier import get_preset, trainer
    from training.classifier.trainer import Splits, materialize
    from training.data import PhantomDataset
    from training.networks.classifier import build_classifier
    from training.runtime import shutdown_distributed

    torch.set_num_threads(1)
    built = []

    def build_and_keep(spec):  # observe this rank's network; train_classifier returns it on rank 0 only
        built.append(build_classifier(spec))
        return built[-1]

    trainer.build_classifier = build_and_keep
    config = get_preset("ci").override(["total_images=256", "batch_size=32", "checkpoint_every=128",
                                        "warmup_images=64", "bootstrap=0", "model.channels=4,8", "device=cpu"])
    parts = [materialize(PhantomDataset(count, 32, seed=seed, prior="balanced"), 0, "phantoms")
             for count, seed in ((128, 5), (64, 6), (64, 7))]
    result = trainer.train_classifier(config, Path(run_dir), progress=False, tensorboard=False,
                                      splits=Splits(*parts, description="phantoms-ddp"))
    # Compare every parameter across the two replicas (the process group is still up).
    flat = torch.cat([p.detach().reshape(-1) for p in built[0].parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        difference = max(float((g - gathered[0]).abs().max()) for g in gathered)
        print(f"REPLICA_MAX_DIFFERENCE {difference:.3e} IMAGES {result.images_shown}", flush=True)
    shutdown_distributed()


@pytest.mark.slow
def test_two_process_gloo_training_keeps_replicas_identical(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("REPLICA_MAX_DIFFERENCE"))
    assert float(line.split()[1]) == 0.0
    assert line.split()[3] == "256"
    assert (tmp_path / "run" / "classifier" / "classifier.safetensors").is_file()
    assert max(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == "checkpoint-000000000256.pt"


if __name__ == "__main__":
    _worker(sys.argv[1])
