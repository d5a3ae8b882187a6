"""Networks: the PGGAN generator and discriminator (`pggan`) and the classifiers (`classifier`)."""

from training.networks.pggan import (
    PAPER_CHANNELS,
    Discriminator,
    EqualizedConv2d,
    EqualizedLinear,
    Generator,
    minibatch_stddev,
    pixel_norm,
)

__all__ = [
    "PAPER_CHANNELS",
    "Discriminator",
    "EqualizedConv2d",
    "EqualizedLinear",
    "Generator",
    "minibatch_stddev",
    "pixel_norm",
]
