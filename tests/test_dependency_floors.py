"""Declared lower bounds are versions the code runs on.

The ``serve`` and ``gpu`` extras declare a boto3 floor; the S3 sink tests (against the moto server on
loopback) run in a subprocess whose boto3 stack is exactly that floor, installed from the package index
into a cache directory once per floor and Python version. Only the client side uses the floors: the
moto server the tests start runs on this environment's own packages.
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SINK_MODULE = REPO / "service" / "sinks.py"
S3_EXTRAS = ("serve", "gpu")

RUNNER = """
import sys
sys.path.insert(0, sys.argv[1])  # the floors shadow this environment's own boto3 stack
import boto3, botocore, pytest
print("floors:", boto3.__version__, botocore.__version__, flush=True)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[2:]]))
"""


def declared_floor(extra: str, package: str) -> Version:
    """The ``>=`` bound of ``package`` in the optional dependency group ``extra`` of pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["optional-dependencies"][extra]:
        requirement = Requirement(line)
        if requirement.name == package:
            floors = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
            assert floors, f"the {extra} extra declares {line!r} without a >= lower bound"
            return max(floors)
    raise AssertionError(f"the {extra} extra does not declare {package}")


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports that are neither the standard library nor ours."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("service", "training")}


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
        pytest.fail(f"pip could not install the declared floors {pins} (exit {result.returncode}); it needs the "
                    f"package index:\n{result.stderr[-3000:]}")
    (partial / ".complete").write_text(key)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete leftover from an interrupted run
    try:
        partial.rename(target)
    except OSError:  # another session finished the same install first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def test_the_s3_extras_agree_and_the_sink_needs_nothing_else():
    assert len({declared_floor(extra, "boto3") for extra in S3_EXTRAS}) == 1, "serve and gpu differ on boto3"
    # If the sink starts importing another package, its floor belongs in the run below as well.
    assert third_party_imports(SINK_MODULE) == {"boto3", "botocore"}


def test_s3_sink_tests_pass_on_the_declared_boto3_floor(request: pytest.FixtureRequest, tmp_path_factory):
    floor = declared_floor("serve", "boto3")
    # boto3 and botocore are released in lockstep: boto3 X.Y.Z requires botocore >= X.Y.Z.
    pins = [f"boto3=={floor}", f"botocore=={floor}"]
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache_root = cache.mkdir("dependency-floors") if cache is not None else tmp_path_factory.mktemp("floors")
    target = install_floors(pins, cache_root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(target), "tests/test_sinks.py"],
        cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    first = output.splitlines()[0] if output else ""
    assert first.startswith("floors:"), output[-3000:]
    assert [Version(v) for v in first.split()[1:]] == [floor, floor], first
    assert result.returncode == 0, output[-6000:]
    assert " passed" in output and " failed" not in output and " error" not in output, output[-3000:]
