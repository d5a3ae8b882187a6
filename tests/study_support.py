"""What the reader-study tests share: a real PostgreSQL server on loopback, the study database under
test (SQLite file or a fresh PostgreSQL database), a small study, and the app served by uvicorn."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from study.create import CaseImage, create_study, read_dataset_cases
from study.storage import migrate, session_factory

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
NIH_SAMPLE = Path(__file__).parent / "data" / "nih-sample"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres(*command: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL 15 server on 127.0.0.1 in a temporary directory, for the session; its admin URL.
    initdb and pg_ctl refuse to run as root, so they run as the ``postgres`` system user."""
    if not (POSTGRES_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL 15 is not installed; `make system-deps` installs it")
    root = Path(tempfile.mkdtemp(prefix="study-pg-"))
    shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    _as_postgres(str(POSTGRES_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    _as_postgres(str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        _as_postgres(str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """An empty, migrated study database: a SQLite file, or a new database on the real server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'study.db'}"
    else:
        import psycopg

        server = request.getfixturevalue("postgres_server")
        name = f"study_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server.replace("postgresql+psycopg", "postgresql") + "/postgres",
                             autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        url = f"{server}/{name}"
    migrate(url)
    return url


def phantom_cases(count: int, size: int, seed: int = 0) -> list[CaseImage]:
    """Synthetic cases drawn by the phantom renderer (fast; for tests of storage and the app)."""
    from service.labels import format_finding_labels
    from training.phantoms import sample_phantom

    cases = []
    for index in range(count):
        image, labels = sample_phantom(index, size, seed, "nih-boosted")
        cases.append(CaseImage("synthetic", image * 2.0 - 1.0, format_finding_labels(labels), f"phantom {index}"))
    return cases


def small_study(url: str, name: str = "pilot", readers=("ann", "bob"), real: int = 3, synthetic: int = 3,
                size: int = 32, ask_findings: bool = True):
    """A study of real NIH images (tests/data) and phantoms; its links."""
    cases = read_dataset_cases(f"nih:{NIH_SAMPLE}", real, size, np.random.default_rng(0), "real")
    cases += phantom_cases(synthetic, size)
    return create_study(session_factory(url), name, name.title(), cases, list(readers), seed=7, resolution=size,
                        ask_findings=ask_findings, setup={"test": True})
