"""PGGAN training: configuration and schedule, WGAN-GP loss, the training loop.

Entry points: `python -m training.cli train|resume|sample` (see training/gan/commands.py), or
`PGGANTrainer` directly; `load_generator(checkpoint)` returns the EMA generator for export.
"""

from training.gan.config import ConfigError, GanConfig, Phase, ProgressiveSchedule, load_config
from training.gan.loss import discriminator_loss, generator_loss, gradient_penalty
from training.gan.training_loop import (
    PGGANTrainer,
    TrainResult,
    build_networks,
    load_generator,
    real_images_at,
)

__all__ = [
    "ConfigError",
    "GanConfig",
    "PGGANTrainer",
    "Phase",
    "ProgressiveSchedule",
    "TrainResult",
    "build_networks",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
    "load_config",
    "load_generator",
    "real_images_at",
]
