"""Reusable training machinery shared by every trainer in `training/`.

- `checkpoint`: atomic save/load of named modules, optimisers, grad scalers, per-rank RNG states and
  JSON-able state; latest-checkpoint discovery in a run directory. Loads never unpickle arbitrary
  objects (`torch.load(weights_only=True)`).
- `distributed`: torchrun environment -> process group (gloo on CPU, NCCL on CUDA), rank helpers,
  gradient averaging in one collective.
- `monitor`: run-directory creation, tqdm progress bar, TensorBoard scalars, JSONL stats, PNG grids.
- `faults`: SIGINT/SIGTERM -> "checkpoint and exit" request; non-finite loss/gradient guard.
- `validation`: start-up configuration checks that report every bad value by its dotted key.
- `presets`: TOML presets (with `extends`) and typed `--set KEY=VALUE` overrides for every trainer.
- `loop`: the loop skeleton both trainers share: run directory across ranks, the guarded optimiser
  step, tick and checkpoint intervals, collective checkpoints.
- `sampler`: a resumable, seeded, rank-sharded batch sampler whose position is a single integer.
"""

from training.runtime.checkpoint import (
    Checkpoint,
    capture_rng_state,
    checkpoint_path,
    gather_rng_states,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    restore_rng_state,
    run_dir_of,
    save_checkpoint,
)
from training.runtime.distributed import (
    DistributedContext,
    all_reduce_flat_,
    average_gradients_,
    broadcast_module_,
    init_distributed,
    shutdown_distributed,
    world_size_from_env,
)
from training.runtime.faults import NonFiniteError, NonFiniteGuard, StopRequest, all_finite
from training.runtime.monitor import TrainingMonitor, create_run_dir, save_image_grid, write_json_atomic
from training.runtime.sampler import ResumableBatchSampler
from training.runtime.validation import Checks, ConfigError

__all__ = [
    "Checkpoint",
    "Checks",
    "ConfigError",
    "DistributedContext",
    "NonFiniteError",
    "NonFiniteGuard",
    "ResumableBatchSampler",
    "StopRequest",
    "TrainingMonitor",
    "all_finite",
    "all_reduce_flat_",
    "average_gradients_",
    "broadcast_module_",
    "capture_rng_state",
    "checkpoint_path",
    "create_run_dir",
    "gather_rng_states",
    "init_distributed",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "read_checkpoint",
    "restore_rng_state",
    "run_dir_of",
    "save_checkpoint",
    "save_image_grid",
    "shutdown_distributed",
    "world_size_from_env",
    "write_json_atomic",
]
