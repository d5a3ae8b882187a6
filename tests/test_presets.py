"""Presets: every classifier preset resolves to exactly the configuration recorded in tests/data/presets.

tests/data/presets/classifier_presets.json was written from the classifier presets as they stood when
they were Python (training/classifier/config.py), so a preset file that drifts from them fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.classifier.config import ClassifierTrainConfig, get_preset, preset_names

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
