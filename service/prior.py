"""Label priors for sampling label sets: the real NIH co-occurrence table, balanced per finding, or a
half-and-half mix of the two.

The NIH table (service/data/nih_label_prior.json) is derived by scripts/compute_nih_prior.py from the
real Data_Entry_2017_v2020 CSV: every distinct label combination with its count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from service.labels import LABELS, NO_FINDING, NUM_LABELS, parse_finding_labels


@dataclass(frozen=True)
class LabelPrior:
    """A distribution over 14-dim multi-hot label vectors."""

    name: str
    combinations: np.ndarray  # [C, 14] float32 multi-hot
    probabilities: np.ndarray  # [C] float64, sums to 1

    def sample(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` label vectors, [count, 14] float32."""
        picks = rng.choice(len(self.probabilities), size=count, p=self.probabilities)
        return self.combinations[picks]

    def given(self, target: np.ndarray, mask: np.ndarray) -> LabelPrior:
        """This prior conditioned on a request: only the combinations with every label that ``mask``
        [14] constrains (> 0.5) equal to ``target`` [14] (1 present, 0 absent), renormalised.

        Raises ValueError when no combination meets the request (probability 0 under this prior)."""
        constrained = np.asarray(mask) > 0.5
        keep = np.all(self.combinations[:, constrained] == (np.asarray(target)[constrained] > 0.5), axis=1)
        if not keep.any():
            raise ValueError(f"no label combination of the {self.name!r} prior meets this request")
        return LabelPrior(f"{self.name} given the request", self.combinations[keep],
                          self.probabilities[keep] / self.probabilities[keep].sum())

    def prevalence(self) -> dict[str, float]:
        """Marginal probability of each label, and of "No Finding"."""
        marginals = self.probabilities @ self.combinations
        result = {label: float(p) for label, p in zip(LABELS, marginals)}
        result[NO_FINDING] = float(self.probabilities[self.combinations.sum(axis=1) == 0].sum())
        return result


@lru_cache(maxsize=1)
def nih_prior() -> LabelPrior:
    table = json.loads(resources.files("service").joinpath("data/nih_label_prior.json").read_text())
    combos = np.stack([parse_finding_labels(c["labels"]) for c in table["combinations"]])
    counts = np.array([c["count"] for c in table["combinations"]], dtype=np.float64)
    return LabelPrior("nih", combos, counts / counts.sum())


@lru_cache(maxsize=1)
def balanced_prior() -> LabelPrior:
    """Each single finding, and "No Finding", equally often: for rare classes."""
    combos = np.concatenate([np.zeros((1, NUM_LABELS), np.float32), np.eye(NUM_LABELS, dtype=np.float32)])
    return LabelPrior("balanced", combos, np.full(len(combos), 1.0 / len(combos)))


@lru_cache(maxsize=1)
def nih_boosted_prior() -> LabelPrior:
    """Half NIH co-occurrence, half balanced single findings: the real table's combinations stay, and
    every finding reaches at least 1/30 of the draws (Hernia: 0.2% -> 3.4%). A generator trained on a few
    thousand phantoms from the NIH table alone sees a handful of hernias and never learns to draw one."""
    nih, balanced = nih_prior(), balanced_prior()
    return LabelPrior("nih-boosted", np.concatenate([nih.combinations, balanced.combinations]),
                      np.concatenate([nih.probabilities, balanced.probabilities]) / 2)


_PRIORS = {"nih": nih_prior, "balanced": balanced_prior, "nih-boosted": nih_boosted_prior}
PRIOR_NAMES = tuple(_PRIORS)


def get_prior(name: str) -> LabelPrior:
    if name not in _PRIORS:
        raise ValueError(f"unknown label prior {name!r}; choose one of {', '.join(PRIOR_NAMES)}")
    return _PRIORS[name]()
