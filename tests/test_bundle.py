"""The bundle loader: integrity checks, loading without torch, and the BentoML model store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from service.bundle import GRAPH_FILES, MANIFEST_NAME, BundleError, load_bundle, verify_bundle
from tests.bundle_fixtures import copy_bundle

REPO = Path(__file__).resolve().parents[1]
BUNDLE_FILES = (MANIFEST_NAME, *GRAPH_FILES.values())

# Makes `import torch` (and torchvision, functorch) fail in the interpreter it is loaded into, so the
# service is shown to need none of them.
TORCH_BLOCKER = textwrap.dedent('''
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "functorch"):
                raise ImportError(f"{name} is blocked: the service must run without torch")
            return None

    sys.meta_path.insert(0, _NoTorch())
''')


def _flip_byte(path: Path, position: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    index = int(len(data) * position)
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("filename", BUNDLE_FILES)
@pytest.mark.parametrize("position", (0.1, 0.5, 0.97))
def test_one_flipped_byte_in_any_file_is_refused_naming_the_file(ci_bundle, tmp_path, filename, position):
    bundle = copy_bundle(ci_bundle, tmp_path / "bundle")
    _flip_byte(bundle / filename, position)
    with pytest.raises(BundleError) as raised:
        load_bundle(bundle)
    assert raised.value.file == str(bundle / filename)
    assert filename in str(raised.value)


def test_one_changed_digit_in_the_manifest_is_refused(ci_bundle, tmp_path):
    """A change that keeps the manifest valid JSON (a threshold digit) is caught by its own digest."""
    bundle = copy_bundle(ci_bundle, tmp_path / "bundle")
    path = bundle / MANIFEST_NAME
    text = path.read_text()
    position = text.index('"thresholds"')
    position = next(i for i in range(position, len(text)) if text[i] in "123456789")
    path.write_text(text[:position] + str((int(text[position]) % 9) + 1) + text[position + 1:])
    with pytest.raises(BundleError, match="checksum mismatch") as raised:
        load_bundle(bundle)
    assert raised.value.file == str(path)


@pytest.mark.parametrize("filename", BUNDLE_FILES)
def test_a_missing_file_is_refused_naming_the_file(ci_bundle, tmp_path, filename):
    bundle = copy_bundle(ci_bundle, tmp_path / "bundle")
    (bundle / filename).unlink()
    with pytest.raises(BundleError, match="missing") as raised:
        verify_bundle(bundle)
    assert raised.value.file == str(bundle / filename)


def test_a_consistently_edited_manifest_that_breaks_the_schema_is_refused(ci_bundle, tmp_path):
    """Even with a recomputed digest, a manifest with a wrong label list is a schema error."""
    from service.bundle import canonical_manifest_bytes, manifest_digest

    bundle = copy_bundle(ci_bundle, tmp_path / "bundle")
    document = json.loads((bundle / MANIFEST_NAME).read_text())
    document["labels"] = document["labels"][::-1]
    document["manifest_sha256"] = manifest_digest(document)
    (bundle / MANIFEST_NAME).write_bytes(canonical_manifest_bytes(document))
    with pytest.raises(BundleError, match="labels must be the 14 NIH labels"):
        verify_bundle(bundle)


def test_a_swapped_graph_with_a_matching_checksum_is_refused_by_its_interface(ci_bundle, tmp_path):
    """A manifest re-sealed around the wrong graph (classifier in the generator's place) still fails."""
    from service.bundle import seal_manifest, sha256_file

    bundle = copy_bundle(ci_bundle, tmp_path / "bundle")
    (bundle / "generator.onnx").write_bytes((bundle / "classifier.onnx").read_bytes())
    document = json.loads((bundle / MANIFEST_NAME).read_text())
    path = bundle / "generator.onnx"
    document["files"]["generator.onnx"] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    del document["manifest_sha256"]
    (bundle / MANIFEST_NAME).write_bytes(seal_manifest(document))
    with pytest.raises(BundleError, match="expected inputs") as raised:
        load_bundle(bundle)
    assert raised.value.file == str(path)


def test_not_a_bundle_is_a_clear_error(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(tmp_path)
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "absent")


def _run(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


def _torchless_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(TORCH_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(REPO)]), **extra}
    return env


def test_service_loads_the_bundle_where_torch_cannot_be_imported(ci_bundle, tmp_path):
    code = textwrap.dedent(f'''
        import sys
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable: the blocker is not active")
        import numpy as np
        import service
        from service.bundle import load_bundle
        bundle = load_bundle({str(ci_bundle)!r})
        z = np.random.default_rng(0).standard_normal((2, bundle.manifest.latent_dim)).astype(np.float32)
        step = bundle.lco_step(z, np.ones((2, 14), np.float32), np.ones((2, 14), np.float32))
        assert step.grad_z.shape == z.shape and np.isfinite(step.grad_z).all()
        assert not any(name.split(".")[0] == "torch" for name in sys.modules)
        print("OK", bundle.manifest.name, bundle.providers[0])
    ''')
    result = _run(code, _torchless_env(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK cxrsynth-ci CPUExecutionProvider" in result.stdout


def test_bundle_is_saved_in_the_bentoml_model_store_and_loads_from_it(ci_bundle, tmp_path):
    home = tmp_path / "bentoml-home"
    save = textwrap.dedent(f'''
        from training.export import save_to_model_store
        print(save_to_model_store({str(ci_bundle)!r}))
        print(save_to_model_store({str(ci_bundle)!r}))  # the same bundle again: same tag, no error
    ''')
    saved = _run(save, {**os.environ, "BENTOML_HOME": str(home)}, REPO)
    assert saved.returncode == 0, saved.stderr[-3000:]
    first, second = saved.stdout.split()[-2:]
    version = verify_bundle(ci_bundle).version
    assert first == second == f"cxrsynth-ci:{version}"
    stored = home / "models" / "cxrsynth-ci" / version
    assert (stored / MANIFEST_NAME).read_bytes() == (ci_bundle / MANIFEST_NAME).read_bytes()

    load = textwrap.dedent(f'''
        import bentoml
        from service.bundle import load_bundle
        tags = [str(m.tag) for m in bentoml.models.list()]
        assert tags == [{first!r}], tags
        for source in ({first!r}, "cxrsynth-ci:latest", bentoml.models.get("cxrsynth-ci:latest"),
                       bentoml.models.BentoModel("cxrsynth-ci:latest")):
            bundle = load_bundle(source)
            assert bundle.manifest.version == {version!r}
        print("OK", bundle.path)
    ''')
    loaded = _run(load, _torchless_env(tmp_path, BENTOML_HOME=str(home)), tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert f"OK {stored}" in loaded.stdout

    missing = _run("from service.bundle import load_bundle; load_bundle('cxrsynth-ci:nosuchversion')",
                   {**os.environ, "BENTOML_HOME": str(home)}, REPO)
    assert missing.returncode != 0 and "neither a bundle directory nor a model in the BentoML store" in missing.stderr


def test_session_options_are_tuned(ci_bundle):
    import onnxruntime as ort

    from service.bundle import SessionTuning, available_cpus

    options = SessionTuning().session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == available_cpus() >= 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.enable_cpu_mem_arena and options.enable_mem_pattern
    bundle = load_bundle(ci_bundle, SessionTuning(intra_op_threads=1))
    assert bundle.providers[-1] == "CPUExecutionProvider"
    assert bundle.thresholds.shape == (14,) and np.all((bundle.thresholds > 0) & (bundle.thresholds < 1))
    with pytest.raises(RuntimeError, match="not available"):
        SessionTuning(providers=("NoSuchExecutionProvider",)).resolved_providers()
