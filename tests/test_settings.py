"""Service settings from CXRSYNTH_* variables: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in [n for n in os.environ if n.startswith("CXRSYNTH_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_and_values_from_the_environment(clean_env, tmp_path):
    defaults = Settings.from_env()
    assert (defaults.bundle, defaults.max_count, defaults.batching, defaults.compute_batch) == (None, 16, True, 0)
    clean_env.setenv("CXRSYNTH_BUNDLE", str(tmp_path / "b"))
    clean_env.setenv("CXRSYNTH_MAX_COUNT", "32")
    clean_env.setenv("CXRSYNTH_BATCHING", "0")
    clean_env.setenv("CXRSYNTH_API_TOKEN", "  ")
    clean_env.setenv("CXRSYNTH_ARCHIVE_LOCAL_ROOT", "")
    given = Settings.from_env()
    assert given.bundle == (tmp_path / "b").resolve() and given.max_count == 32 and given.batching is False
    assert given.api_token is None and given.archive_local_root is None  # blank means unset


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("CXRSYNTH_MAX_COUNT", "0", "CXRSYNTH_MAX_COUNT: Input should be greater than or equal to 1 (got '0')"),
    ("CXRSYNTH_MAX_BATCH", "lots", "CXRSYNTH_MAX_BATCH: Input should be a valid integer"),
    ("CXRSYNTH_BATCHING", "maybe", "CXRSYNTH_BATCHING: Input should be a valid boolean"),
    ("CXRSYNTH_COMPUTE_BATCH", "-1", "CXRSYNTH_COMPUTE_BATCH: Input should be greater than or equal to 0"),
])
def test_a_bad_variable_is_named_with_what_it_takes(clean_env, name, value, fragment):
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        Settings.from_env()
    assert fragment in str(info.value)


def test_the_table_of_settings_prints_every_variable():
    result = subprocess.run([sys.executable, "-m", "service.settings"], check=False, capture_output=True, text=True,
                            timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    for name in Settings.model_fields:
        assert f"`CXRSYNTH_{name.upper()}`" in result.stdout
