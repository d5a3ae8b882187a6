"""Declared lower bounds are versions the code runs on.

Each run below installs the declared floor of the packages one part of the code uses, from the package
index into a cache directory (once per floor and Python version), and runs that part's tests in a
subprocess where those versions shadow this environment's own; everything else comes from this
environment. The S3 run covers the boto3 floor of the ``serve`` and ``gpu`` extras (the moto server
those tests start is a separate process on this environment's packages: only the client side is at
the floor); the image run covers the Pillow floor of the base dependencies.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

RUNNER = """
import importlib.metadata, sys
sys.path.insert(0, sys.argv[1])  # the floors shadow this environment's own packages
names = sys.argv[2].split(",")
print("floors:", " ".join(importlib.metadata.version(name) for name in names), flush=True)
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[3:]]))
"""


def declared_floor(package: str, extra: str | None = None) -> Version:
    """The ``>=`` bound of ``package`` in the base dependencies, or in optional group ``extra``."""
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    for line in lines:
        requirement = Requirement(line)
        if requirement.name.lower() == package:
            floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
            assert floors, f"{line!r} has no >= lower bound"
            return max(floors)
    raise AssertionError(f"{package} is not declared in {extra or 'the base dependencies'}")


@dataclass(frozen=True)
class FloorRun:
    modules: tuple[str, ...]  # the code whose third-party imports the pins must cover
    third_party: frozenset[str]  # those imports, as module names
    pins: tuple[tuple[str, Version], ...]  # (distribution, floor) installed at exactly that version
    tests: tuple[str, ...]


def floor_runs() -> dict[str, FloorRun]:
    boto3 = declared_floor("boto3", "serve")
    return {
        "s3": FloorRun(
            modules=("service/sinks.py",),
            third_party=frozenset({"boto3", "botocore"}),
            # boto3 and botocore are released in lockstep: boto3 X.Y.Z requires botocore >= X.Y.Z.
            pins=(("boto3", boto3), ("botocore", boto3)),
            tests=("tests/test_sinks.py",),
        ),
        "images": FloorRun(
            modules=("training/data/images.py", "training/data/cache.py", "training/data/walk.py"),
            # numpy and torch stay this environment's: torch is built against a numpy of its choosing.
            third_party=frozenset({"PIL", "numpy", "torch"}),
            pins=(("pillow", declared_floor("pillow")),),
            tests=("tests/test_data_images.py", "tests/test_data_chexpert.py"),
        ),
    }


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports that are neither the standard library nor ours."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    ours = ("service", "training")
    return {name for name in names if name not in sys.stdlib_module_names and name not in ours}


def install_floors(pins: list[str], cache_root: Path) -> Path:
    """A directory holding ``pins`` and their dependencies, installed once per pins and Python version."""
    key = "\n".join([*pins, platform.python_version(), sys.platform, platform.machine()])
    target = cache_root / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return target
    partial = cache_root / f"{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
         "--target", str(partial), *pins],
        check=False, capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        pytest.fail(f"pip could not install the declared floors {pins} (exit {result.returncode}); "
                    f"it needs the package index:\n{result.stderr[-3000:]}")
    (partial / ".complete").write_text(key)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover from an interrupted run
    try:
        partial.rename(target)
    except OSError:  # another session finished the same install first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def test_the_s3_extras_declare_one_boto3_floor():
    assert declared_floor("boto3", "serve") == declared_floor("boto3", "gpu")


@pytest.mark.parametrize("name", sorted(floor_runs()))
def test_each_run_covers_what_its_code_imports(name):
    run = floor_runs()[name]
    # If the code starts importing another package, its floor belongs in the run as well.
    assert set().union(*(third_party_imports(REPO / module) for module in run.modules)) == run.third_party


@pytest.mark.parametrize("name", sorted(floor_runs()))
def test_tests_pass_on_the_declared_floors(name, request: pytest.FixtureRequest, tmp_path_factory):
    run = floor_runs()[name]
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache_root = cache.mkdir("dependency-floors") if cache is not None else tmp_path_factory.mktemp("floors")
    target = install_floors([f"{package}=={floor}" for package, floor in run.pins], cache_root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(target), ",".join(package for package, _ in run.pins), *run.tests],
        cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    first = output.splitlines()[0] if output else ""
    assert first.startswith("floors:"), output[-3000:]
    assert [Version(v) for v in first.split()[1:]] == [floor for _, floor in run.pins], first
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and " failed" not in output and " error" not in output, output[-3000:]
