"""End to end: a real `bentoml serve` subprocess on an exported bundle, with S3 from moto's server mode.

Two servers per module: an open one writing to the shared moto server, and one with bearer-token
auth whose S3 is a moto server with IAM enforcement, for denied credentials and the clean-up of a
half-written set.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from openapi_schema_validator import OAS30Validator
from PIL import Image

from service.labels import LABELS
from service.processes import spawn, stop_group
from service.schemas import MAX_SEED, S3_URI_PATTERN
from tests.openapi_requests import inline_refs, invalid_instance, valid_instance


@pytest.fixture(scope="module")
def exported_bundle(ci_bundle: Path) -> Path:
    """The `ci` bundle: a trained 32² PGGAN and classifier, exported by the export command."""
    return ci_bundle


ROOT = Path(__file__).resolve().parents[1]
TOKEN = "e2e-secret-token"


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BentoServer:
    """`bentoml serve service.service:CXRSynth` on a free loopback port, in a session of its own that
    ends with the test run (service/processes.py)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "bentoml", "serve", "service.service:CXRSynth",
                   "--host", "127.0.0.1", "--port", str(self.port), "--working-dir", str(ROOT)]
        with open(log_path, "wb") as log:  # the server keeps its own copy of the descriptor
            self.process = spawn(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait_ready(self, timeout: float = 180.0) -> BentoServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            try:
                if call(self, "GET", "/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"service not ready within {timeout:.0f} s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.process)


def call(server: BentoServer, method: str, path: str, body: object = None, raw: bytes | None = None,
         token: str | None = None, timeout: float = 120.0) -> tuple[int, dict | str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server.url + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    text = payload.decode(errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def server_env(bundle_dir: Path, home: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CXRSYNTH_", "AWS_"))}
    env.update({
        "CXRSYNTH_BUNDLE": str(bundle_dir),
        "CXRSYNTH_MAX_COUNT": "8",
        "CXRSYNTH_MAX_BODY_BYTES": "16384",
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "OMP_NUM_THREADS": "1",
        **extra,
    })
    return env


@pytest.fixture(scope="module")
def server(exported_bundle, s3_server, tmp_path_factory) -> BentoServer:
    home = tmp_path_factory.mktemp("bentoml-open")
    env = server_env(exported_bundle, home, s3_server.env)
    bento = BentoServer(env, home / "serve.log")
    try:
        yield bento.wait_ready()
    finally:
        bento.stop()


@pytest.fixture(scope="module")
def thresholds(server) -> dict[str, float]:
    status, body = call(server, "GET", "/labels")
    assert status == 200
    return {entry["name"]: entry["threshold"] for entry in body["labels"] if entry["threshold"] is not None}


def message_text(response: dict) -> str:
    """The error and every validation message of an error response, as one string."""
    detail = response.get("detail")
    messages = [item.get("msg", "") for item in detail] if isinstance(detail, list) else [str(detail or "")]
    return " ".join([response.get("error", ""), *messages])


def decode_png(data: bytes) -> np.ndarray:
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return np.asarray(picture)


def check_image(image: dict, thresholds: dict[str, float], resolution: int, bits: int = 8) -> None:
    assert set(image["probabilities"]) == set(LABELS)
    on_side = [(image["probabilities"][name] >= thresholds[name]) == wanted for name, wanted in image["labels"].items()]
    assert image["satisfied"] == all(on_side)
    if image.get("data") is not None:
        pixels = decode_png(base64.b64decode(image["data"]))
        assert pixels.shape == (resolution, resolution)
        assert pixels.dtype == (np.uint8 if bits == 8 else np.uint16)
        assert pixels.std() > 0, "a blank image"


# -- the open server -----------------------------------------------------------------------------
def test_probes_model_and_labels(server, exported_bundle):
    assert call(server, "GET", "/livez")[0] == 200
    assert call(server, "GET", "/readyz")[0] == 200
    assert "the API is open" in server.output()
    status, model = call(server, "GET", "/model")
    manifest = json.loads((exported_bundle / "manifest.json").read_text())
    assert status == 200 and model["version"] == manifest["version"] and model["latent_dim"] == manifest["latent_dim"]
    assert model["auditor"] is None and model["verify_default"] is False  # a bundle exported without --auditor
    assert model["steering"] is None and model["classifier_passes"] == 1  # steered by its one classifier
    status, labels = call(server, "GET", "/labels")
    names = [entry["name"] for entry in labels["labels"]]
    assert names == [*LABELS, "No Finding"]
    prevalence = {entry["name"]: entry["prevalence"] for entry in labels["labels"]}
    assert prevalence["Hernia"] < prevalence["Infiltration"] < prevalence["No Finding"]


def test_generate_inline_is_labelled_and_reproducible(server, thresholds):
    body = {"labels": {"Effusion": True, "Pneumothorax": False}, "count": 3, "seed": 2024}
    status, response = call(server, "POST", "/generate", body)
    assert status == 200, response
    resolution = call(server, "GET", "/model")[1]["resolution"]
    assert [image["seed"] for image in response["images"]] == [2024, 2025, 2026]
    assert len({image["id"] for image in response["images"]}) == 3
    for image in response["images"]:
        assert image["labels"] == {"Effusion": True, "Pneumothorax": False}
        assert image["uri"] is None
        check_image(image, thresholds, resolution)
        # rejection first: a latent accepted without steps is returned as it was scored
        assert image["candidates_scored"] >= 1
        assert not image["accepted_without_steps"] or (image["steps"] == 0 and image["satisfied"])
    assert response["satisfied"] == sum(image["satisfied"] for image in response["images"])
    # the same seed gives the same image, alone or with others
    status, again = call(server, "POST", "/generate", {**body, "count": 1, "seed": 2025})
    assert status == 200 and again["images"][0]["data"] == response["images"][1]["data"]


def test_a_seed_gives_the_same_bytes_alone_inside_a_request_and_under_concurrent_load(server):
    """GET /model names what an image depends on besides its request; within it, the count, the
    image's place in its request and the requests sharing the running batch change nothing."""
    model = call(server, "GET", "/model")[1]
    assert model["compute_batch"] >= 1 and model["execution_providers"]
    body = {"labels": ["Effusion", "Mass", "Nodule", "Hernia"], "exclusive": True}
    status, alone = call(server, "POST", "/generate", {**body, "count": 1, "seed": 1})
    assert status == 200, alone
    assert alone["images"][0]["steps"] > 10, "a request that takes many steps, or this tests nothing"
    wanted = alone["images"][0]["data"]
    status, eight = call(server, "POST", "/generate", {**body, "count": 8, "seed": 0})
    assert status == 200 and eight["images"][1]["seed"] == 1 and eight["images"][1]["data"] == wanted
    # Concurrent requests of other sizes and labels share the running batch with seed 1.
    requests = [{**body, "count": 1, "seed": 1}, {**body, "count": 3, "seed": 0},
                {"labels": ["Cardiomegaly"], "count": 5, "seed": 40}, {**body, "count": 2, "seed": 1}]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda request: call(server, "POST", "/generate", request), requests))
    assert all(status == 200 for status, _ in answers)
    assert answers[0][1]["images"][0]["data"] == wanted
    assert answers[1][1]["images"][1]["data"] == wanted
    assert answers[3][1]["images"][0]["data"] == wanted
    assert answers[3][1]["images"][1]["data"] == eight["images"][2]["data"]


def test_generate_png16_exclusive_and_no_finding(server, thresholds):
    resolution = call(server, "GET", "/model")[1]["resolution"]
    status, response = call(server, "POST", "/generate",
                            {"labels": ["Cardiomegaly"], "exclusive": True, "format": "png16", "seed": 5})
    assert status == 200, response
    image = response["images"][0]
    assert len(image["labels"]) == len(LABELS) and image["labels"]["Cardiomegaly"] is True
    check_image(image, thresholds, resolution, bits=16)
    status, response = call(server, "POST", "/generate", {"labels": ["No Finding"], "seed": 6})
    assert status == 200 and all(value is False for value in response["images"][0]["labels"].values())


def test_strict_retries_unsatisfied_images_with_new_seeds(server):
    impossible = {name: True for name in LABELS}  # every finding at once, with no optimisation
    status, response = call(server, "POST", "/generate", {
        "labels": impossible, "count": 2, "seed": 9, "strict": True, "retries": 2,
        "lco": {"steps": 0, "candidates": 1},
    })
    assert status == 200, response
    for index, image in enumerate(response["images"]):
        if not image["satisfied"]:
            assert image["attempts"] == 3 and image["seed"] != 9 + index


def test_generate_to_s3_uploads_png_and_sidecar_per_image(server, s3_server):
    bucket = s3_server.new_bucket()
    status, response = call(server, "POST", "/generate", {
        "labels": {"Mass": True}, "count": 3, "seed": 77, "destination": f"s3://{bucket}/runs/today/",
    })
    assert status == 200, response
    client = s3_server.client()
    keys = sorted(item["Key"] for item in client.list_objects_v2(Bucket=bucket)["Contents"])
    request_id = response["request_id"]
    assert keys == sorted(f"runs/today/{request_id}/{i:04d}.{ext}" for i in range(3) for ext in ("png", "json"))
    for index, image in enumerate(response["images"]):
        assert image["data"] is None
        assert image["uri"] == f"s3://{bucket}/runs/today/{request_id}/{index:04d}.png"
        png = client.get_object(Bucket=bucket, Key=f"runs/today/{request_id}/{index:04d}.png")
        assert png["ContentType"] == "image/png"
        assert png["Metadata"]["seed"] == str(image["seed"])
        assert decode_png(png["Body"].read()).std() > 0
        sidecar = json.loads(client.get_object(Bucket=bucket, Key=f"runs/today/{request_id}/{index:04d}.json")["Body"].read())
        for field in ("id", "seed", "labels", "probabilities", "satisfied", "steps", "accepted_without_steps",
                      "candidates_scored", "attempts"):
            assert sidecar[field] == image[field], field
        assert sidecar["model"] == response["model"]


def test_unknown_bucket_is_a_clear_404(server):
    status, body = call(server, "POST", "/generate", {"labels": ["Mass"], "destination": "s3://no-such-bucket-here/x"})
    assert status == 404
    assert "no-such-bucket-here" in body["error"] and body["detail"]["s3_code"] == "NoSuchBucket"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"labels": {"Pneumonitis": True}}, 400, "valid labels are: Atelectasis"),
        ({"labels": {"Effusion": True, "effusion": False}}, 400, "both present and absent"),
        ({"labels": ["No Finding", "Hernia"]}, 400, '"No Finding" cannot be combined'),
        ({"count": 0}, 400, "count must be between 1 and 8"),
        ({"count": 9}, 400, "count must be between 1 and 8"),
        ({"count": "two"}, 400, "valid integer"),
        ({"labels": {"Mass": "yes"}}, 400, "valid boolean"),
        ({"seed": -5}, 400, "greater than or equal to 0"),
        ({"seed": 2**60}, 400, "less than or equal to"),
        ({"destination": "bucket/prefix"}, 400, "is not an S3 URI"),
        ({"destination": "s3://bucket/a/../../etc"}, 400, "'..' segment"),
        ({"destination": "s3://bucket/a\u0007b"}, 400, "control characters"),
        ({"destination": "s3://bucket\n"}, 400, "not a valid bucket name"),
        ({"lco": {"steps": 100000}}, 400, "less than or equal to 1000"),
        ({"lco": {"lr": -1}}, 400, "greater than or equal to"),
        ({"lco": {"candidates": 1000}}, 400, "less than or equal to 64"),
        ({"verify": True}, 400, "has no auditor"),
        ({"verify_retries": 1000}, 400, "verify_retries must be at most"),
    ],
)
def test_bad_input_is_a_4xx_that_says_what_to_fix(server, body, status, fragment):
    got, response = call(server, "POST", "/generate", body)
    assert got == status, response
    assert fragment in message_text(response), response


def test_malformed_and_oversized_bodies(server):
    status, response = call(server, "POST", "/generate", raw=b'{"labels": {"Mass": true')
    assert status == 400 and "Invalid JSON" in message_text(response)
    status, response = call(server, "POST", "/generate", raw=json.dumps({"labels": ["Mass"] * 5000}).encode())
    assert status == 413 and "larger than 16384 bytes" in response["error"]
    # still serving after all the bad input
    status, response = call(server, "POST", "/generate", {"labels": ["Mass"], "seed": 1})
    assert status == 200 and len(response["images"]) == 1


def test_metrics_show_project_and_bentoml_series(server, s3_server):
    responses = [call(server, "POST", "/generate", {"labels": ["Nodule"], "count": 2, "seed": 3})[1],
                 call(server, "POST", "/generate", {"labels": ["Nodule"], "seed": 4,
                                                    "destination": f"s3://{s3_server.new_bucket()}/m"})[1]]
    status, text = call(server, "GET", "/metrics")
    assert status == 200
    assert "bentoml_service_request_total" in text
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith('cxrsynth_images_total{finding="Nodule"'))
    assert counted >= 3
    for series in ("cxrsynth_lco_steps_bucket", "cxrsynth_satisfied_ratio", "cxrsynth_s3_upload_seconds_count",
                   "cxrsynth_lco_batch_size_bucket", 'cxrsynth_s3_upload_errors_total{code="NoSuchBucket"}'):
        assert series in text, series
    accepted = sum(image["accepted_without_steps"] for response in responses for image in response["images"])
    assert sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('cxrsynth_lco_accepted_without_steps_total{source="generate"}')) >= accepted
    ratio = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("cxrsynth_satisfied_ratio"))
    assert 0.0 <= ratio <= 1.0


# -- media types -----------------------------------------------------------------------------------
JSON_BODY = json.dumps({"labels": ["Effusion"], "seed": 1, "lco": {"steps": 2, "candidates": 2}}).encode()
MULTIPART_BODY = b'--x\r\nContent-Disposition: form-data; name="count"\r\n\r\n1\r\n--x--\r\n'


def send(server: BentoServer, method: str, path: str, body: bytes | None,
         content_types: list[str]) -> tuple[int, dict | str, str | None]:
    """One request with exactly these Content-Type headers (none, one or several), as curl may send.
    Returns the status, the body (parsed if JSON) and the response's Accept header."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.putrequest(method, path)
        for value in content_types:
            connection.putheader("Content-Type", value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        status, accept = response.status, response.getheader("Accept")
        payload = response.read().decode(errors="replace")
    finally:
        connection.close()
    try:
        return status, json.loads(payload), accept
    except json.JSONDecodeError:
        return status, payload, accept


@pytest.mark.parametrize(
    ("content_types", "body", "fragment"),
    [
        ([], JSON_BODY, "no Content-Type header"),
        (["application/x-www-form-urlencoded"], JSON_BODY, "curl --json"),  # what curl -d sends
        (["multipart/form-data"], b'{"count": 1, "labels": {"Effusion": true}}', "not accepted"),
        (["multipart/form-data; boundary=x"], MULTIPART_BODY, "not accepted"),
        (["text/plain"], JSON_BODY, "not accepted"),
        (["application/xml"], b"<labels/>", "not accepted"),
        (["application/json; charset"], JSON_BODY, "not a valid media type"),
        (["application"], JSON_BODY, "not a valid media type"),
        ([""], JSON_BODY, "not a valid media type"),
        (["application/json; charset=latin-1"], JSON_BODY, "JSON is UTF-8"),
        (["application/json", "text/plain"], JSON_BODY, "2 Content-Type headers"),
    ],
)
def test_a_body_not_declared_as_json_is_a_415_that_says_what_to_send(server, content_types, body, fragment):
    status, response, accept = send(server, "POST", "/generate", body, content_types)
    assert status == 415, response
    assert fragment in response["error"] and "Content-Type: application/json" in response["error"], response
    assert accept == "application/json"


@pytest.mark.parametrize(
    "content_type",
    ["application/json; charset=utf-8", 'Application/JSON;Charset="UTF-8"', "application/vnd.api+json"],
)
def test_json_media_types_with_parameters_and_suffixes_are_served(server, content_type):
    status, response, _ = send(server, "POST", "/generate", JSON_BODY, [content_type])
    assert status == 200, response
    assert response["images"][0]["labels"] == {"Effusion": True} and response["images"][0]["seed"] == 1


def test_a_request_without_a_body_needs_no_content_type(server):
    status, response, _ = send(server, "POST", "/generate", None, [])
    assert status == 200, response
    # the defaults: one image, unconditional
    assert len(response["images"]) == 1 and response["images"][0]["labels"] == {}


def test_every_endpoint_that_takes_a_body_refuses_form_data_with_a_415(server):
    status, document = call(server, "GET", "/docs.json")
    assert status == 200
    routes = [(method.upper(), path) for path, item in document["paths"].items() for method in item
              if method in ("post", "put", "patch")]
    assert {("POST", "/generate"), ("POST", "/archive/submit"), ("POST", "/archive/stop")} <= set(routes)
    for method, path in routes:
        status, response, _ = send(server, method, path, b"task_id=x", ["application/x-www-form-urlencoded"])
        assert status == 415, (method, path, response)
        assert "Content-Type: application/json" in response["error"], (method, path, response)


# -- POST /edit ---------------------------------------------------------------------------------------
def test_edit_recomputes_the_reference_and_returns_the_pair_its_difference_and_both_probabilities(server, thresholds):
    version = call(server, "GET", "/model")[1]["version"]
    made = {"labels": {"Effusion": False}, "seed": 77, "format": "png16"}
    status, generated = call(server, "POST", "/generate", made)
    assert status == 200, generated
    reference = {"model_version": version, "seed": 77, "labels": {"Effusion": False}}
    status, pair = call(server, "POST", "/edit", {"reference": reference, "change": {"add": ["effusion"]},
                                                  "format": "png16"})
    assert status == 200, pair
    # the reference, made again from its description alone, is the image /generate returned
    assert pair["before"]["data"] == generated["images"][0]["data"]
    assert pair["add"] == ["Effusion"] and pair["remove"] == []
    assert pair["before"]["labels"] == {"Effusion": False} and pair["after"]["labels"] == {"Effusion": True}
    after = pair["after"]
    assert after["satisfied"] == (after["probabilities"]["Effusion"] >= thresholds["Effusion"])
    before_pixels = decode_png(base64.b64decode(pair["before"]["data"])).astype(np.float64)
    after_pixels = decode_png(base64.b64decode(after["data"])).astype(np.float64)
    difference = np.asarray(Image.open(io.BytesIO(base64.b64decode(pair["difference"]))))
    assert difference.shape == (*after_pixels.shape, 3)
    if pair["difference_scale"] > 0:  # red where brighter, blue where darker
        brighter = (after_pixels - before_pixels) > 0.5 * 65535 * pair["difference_scale"] / 2
        assert (difference[brighter][:, 0] >= difference[brighter][:, 2]).all()
    assert pair["latent_distance"] >= 0 and after["auditor_probabilities"] is None
    status, again = call(server, "POST", "/edit", {"reference": reference, "change": {"add": ["Effusion"]},
                                                   "format": "png16"})
    assert status == 200 and again["after"]["data"] == after["data"]  # deterministic, no server state


@pytest.mark.parametrize(
    "change, reference_labels, fragment",
    [
        ({}, {"Effusion": False}, "the change is empty"),
        ({"add": ["Pleural Effusions?"]}, {}, "unknown label"),
        ({"add": ["Effusion"]}, {"Effusion": True}, "already requests Effusion present"),
        ({"remove": ["Nodule"]}, ["No Finding"], "already requests Nodule absent"),
        ({"add": ["Mass"], "remove": ["mass"]}, {}, "named twice"),
        ({"add": ["No Finding"]}, {}, '"No Finding" cannot be added'),
    ],
)
def test_edit_refuses_a_change_that_cannot_apply_with_a_400(server, change, reference_labels, fragment):
    version = call(server, "GET", "/model")[1]["version"]
    body = {"reference": {"model_version": version, "seed": 1, "labels": reference_labels}, "change": change}
    status, response = call(server, "POST", "/edit", body)
    assert status == 400, response
    assert fragment in message_text(response), response


def test_edit_of_an_image_from_another_model_version_is_a_409_naming_both(server):
    version = call(server, "GET", "/model")[1]["version"]
    body = {"reference": {"model_version": "19990101.000000-0000000", "seed": 1}, "change": {"add": ["Mass"]}}
    status, response = call(server, "POST", "/edit", body)
    assert status == 409, response
    assert "19990101.000000-0000000" in response["error"] and version in response["error"]


# -- the OpenAPI document ----------------------------------------------------------------------------
def generate_request_schema(server: BentoServer) -> dict:
    status, document = call(server, "GET", "/docs.json")
    assert status == 200
    schema = document["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return inline_refs(schema, document)


def test_the_openapi_document_states_what_generate_accepts(server):
    properties = generate_request_schema(server)["properties"]
    objects, lists = properties["labels"]["oneOf"][:2], properties["labels"]["oneOf"][2:]
    assert set(objects[0]["properties"]) == set(LABELS) and objects[0]["additionalProperties"] is False
    assert objects[1]["required"] == ["No Finding"] and lists[0]["items"]["enum"] == list(LABELS)
    assert (properties["count"]["minimum"], properties["count"]["maximum"]) == (1, 8)  # CXRSYNTH_MAX_COUNT
    assert (properties["seed"]["minimum"], properties["seed"]["maximum"]) == (0, MAX_SEED)
    assert properties["destination"]["pattern"] == S3_URI_PATTERN
    lco = properties["lco"]["properties"]
    assert (lco["steps"]["minimum"], lco["steps"]["maximum"]) == (0, 1000)
    assert (lco["candidates"]["minimum"], lco["candidates"]["maximum"]) == (1, 64)


def test_requests_drawn_from_the_openapi_document(server, s3_server):
    """What a client generated from /docs.json sends: valid requests are served (200), requests that
    break one stated rule are a 400, and nothing is a 5xx."""
    schema = generate_request_schema(server)
    validator = OAS30Validator(schema)
    bucket = s3_server.new_bucket()
    rng = random.Random(5)
    caps = {"count": 2, "retries": 1, "steps": 3, "candidates": 4}  # cheap requests on shared cores
    for _ in range(16):
        body = valid_instance(schema, rng, caps)
        lco = body.get("lco") or {}
        # the service's default LCO runs 200 steps over 32 candidates: keep every request cheap
        body["lco"] = {**lco, "steps": lco.get("steps") or 0, "candidates": lco.get("candidates") or 1}
        if rng.random() < 0.25:
            body["destination"] = f"s3://{bucket}/drawn/{rng.randrange(1000)}"
        assert validator.is_valid(body), body
        status, response = call(server, "POST", "/generate", body)
        assert status == 200, (body, response)
        assert len(response["images"]) == (body.get("count") or 1)
        broken, where = invalid_instance(schema, rng, caps)
        assert not validator.is_valid(broken), (where, broken)
        status, response = call(server, "POST", "/generate", broken)
        assert status == 400 and response["error"], (where, broken, response)


# -- the server with auth, on an S3 that enforces IAM ----------------------------------------------
@pytest.fixture(scope="module")
def iam_s3(monkeypatch_module) -> dict:
    """A moto server enforcing IAM: user 'writer' may use bucket 'partial' but not write *.json there."""
    import boto3

    from tests.s3_server import FAKE_CREDENTIALS, MotoS3Server

    setup_calls = 5  # the requests below that run before authentication is enforced
    monkeypatch_module.setenv("INITIAL_NO_AUTH_ACTION_COUNT", str(setup_calls))
    moto = MotoS3Server().start()
    try:
        admin = {"endpoint_url": moto.endpoint_url, "region_name": "us-east-1",
                 "aws_access_key_id": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 "aws_secret_access_key": FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="writer")
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        iam.put_user_policy(UserName="writer", PolicyName="partial-writer", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["arn:aws:s3:::partial", "arn:aws:s3:::partial/*"]},
                {"Effect": "Deny", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::partial/*.json"]},
            ],
        }))
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket="partial")
        s3.create_bucket(Bucket="forbidden")
        user = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto.endpoint_url,
                "AWS_MAX_ATTEMPTS": "1"}
        yield {"env": user, "client": boto3.client("s3", endpoint_url=moto.endpoint_url, region_name="us-east-1",
                                                    aws_access_key_id=key["AccessKeyId"],
                                                    aws_secret_access_key=key["SecretAccessKey"])}
    finally:
        moto.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def auth_server(exported_bundle, iam_s3, tmp_path_factory) -> BentoServer:
    home = tmp_path_factory.mktemp("bentoml-auth")
    env = server_env(exported_bundle, home, {**iam_s3["env"], "CXRSYNTH_API_TOKEN": TOKEN})
    bento = BentoServer(env, home / "serve.log")
    try:
        yield bento.wait_ready()
    finally:
        bento.stop()


def test_auth_on_requires_the_bearer_token(auth_server):
    assert "bearer-token auth is on" in auth_server.output()
    assert "the API is open" not in auth_server.output()
    for path, method, body in (("/generate", "POST", {"labels": ["Mass"]}), ("/labels", "GET", None),
                               ("/model", "GET", None)):
        status, response = call(auth_server, method, path, body)
        assert status == 401 and "Authorization: Bearer" in response["error"]
        assert call(auth_server, method, path, body, token="wrong")[0] == 401
        assert call(auth_server, method, path, body, token=TOKEN)[0] == 200
    for probe in ("/livez", "/readyz", "/metrics"):
        assert call(auth_server, "GET", probe)[0] == 200


def test_denied_credentials_are_a_403_with_s3s_message(auth_server):
    status, body = call(auth_server, "POST", "/generate", {"labels": ["Mass"], "destination": "s3://forbidden/x"},
                        token=TOKEN)
    assert status == 403 and "forbidden" in body["error"]
    assert body["detail"]["s3_message"]


def test_a_failed_upload_leaves_no_partial_set(auth_server, iam_s3):
    status, body = call(auth_server, "POST", "/generate",
                        {"labels": ["Mass"], "count": 3, "seed": 1, "destination": "s3://partial/run"}, token=TOKEN)
    assert status == 403, body
    assert body["detail"]["s3_code"] == "AccessDenied" and "Access Denied" in body["detail"]["s3_message"]
    assert iam_s3["client"].list_objects_v2(Bucket="partial").get("Contents", []) == []


def test_generate_dicom_gives_secondary_capture_with_the_png16_pixels(server):
    import pydicom

    from service.dicom import read_origin

    body = {"labels": {"Effusion": True}, "count": 2, "seed": 31}
    status, png = call(server, "POST", "/generate", {**body, "format": "png16"})
    assert status == 200, png
    status, dicom = call(server, "POST", "/generate", {**body, "format": "dicom"})
    assert status == 200, dicom
    model = call(server, "GET", "/model")[1]
    series = set()
    for png_image, dicom_image in zip(png["images"], dicom["images"]):
        assert dicom_image["media_type"] == "application/dicom"
        ds = pydicom.dcmread(io.BytesIO(base64.b64decode(dicom_image["data"])))
        assert np.array_equal(ds.pixel_array, decode_png(base64.b64decode(png_image["data"])))
        origin = read_origin(ds)
        assert origin is not None and origin.seed == dicom_image["seed"] and origin.requested == {"Effusion": True}
        assert (origin.model_name, origin.model_version) == (model["name"], model["version"])
        assert "SYNTHETIC" in ds.SeriesDescription and ds.PatientID == f"SYNTHETIC-{dicom_image['id']}"
        series.add((ds.StudyInstanceUID, ds.SeriesInstanceUID))
    assert len(series) == 1, "one request is one study and one series"
