"""Shared fixtures. Data the tests read lives in tests/data/ so a fresh clone needs nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_server"]

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def nih_csv() -> Path:
    return DATA / "nih" / "Data_Entry_2017_v2020.csv.gz"


@pytest.fixture(scope="session")
def nih_bbox_csv() -> Path:
    return DATA / "nih" / "BBox_List_2017.csv.gz"
