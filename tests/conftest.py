"""Shared fixtures. Data the tests read lives in tests/data/ so a fresh clone needs nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Under pytest-xdist each worker is one of several processes sharing the cores: one thread each (and in
# the processes they start), since two threads per process on shared cores run many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["tests.s3_server", "tests.bundle_fixtures", "tests.study_support"]

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def nih_csv() -> Path:
    return DATA / "nih" / "Data_Entry_2017_v2020.csv.gz"


@pytest.fixture(scope="session")
def nih_bbox_csv() -> Path:
    return DATA / "nih" / "BBox_List_2017.csv.gz"


@pytest.fixture
def single_torch_thread():
    """Small networks on shared cores run fastest single-threaded; the setting is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
