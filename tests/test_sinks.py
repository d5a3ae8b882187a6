"""Sinks against a real S3 API (moto server on loopback) and a real directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.sinks import (
    LocalSink,
    S3Sink,
    SinkError,
    SinkKeyNotFound,
    parse_s3_uri,
    sink_from_uri,
)


@pytest.fixture(params=["local", "s3"])
def sink(request, tmp_path):
    if request.param == "local":
        return LocalSink(tmp_path / "out")
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    return S3Sink(bucket, "runs/a", client=server.client())


def test_put_get_list_delete_roundtrip(sink, tmp_path):
    payload = bytes(range(256)) * 10
    uri = sink.put("images/0001.png", payload, "image/png", {"sha256": "abc"})
    sink.put("images/0002.png", b"two", "image/png")
    sink.put("manifests/m.jsonl", b"{}\n", "application/x-ndjson")
    assert uri == sink.uri("images/0001.png")
    assert sink.get("images/0001.png") == payload
    assert sink.exists("images/0002.png") and not sink.exists("images/0003.png")
    assert sink.list("images/") == ["images/0001.png", "images/0002.png"]
    assert dict(sink.list_sizes("")) == {
        "images/0001.png": len(payload),
        "images/0002.png": 3,
        "manifests/m.jsonl": 3,
    }
    assert sink.list("images/", start_after="images/0001.png") == ["images/0002.png"]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    assert sink.put_file("files/big.bin", big) == sink.uri("files/big.bin")
    assert sink.get("files/big.bin") == big.read_bytes()
    sink.put("images/0002.png", b"replaced")
    assert sink.get("images/0002.png") == b"replaced"
    sink.delete("images/0002.png")
    sink.delete("images/0002.png")  # already gone: no error
    assert sink.list("images/") == ["images/0001.png"]
    with pytest.raises(SinkKeyNotFound) as raised:
        sink.get("images/0002.png")
    assert raised.value.code == "NoSuchKey"


def test_s3_keys_live_under_prefix_and_carry_metadata(s3_server):
    bucket = s3_server.new_bucket()
    S3Sink(bucket, "/deep/prefix/", client=s3_server.client()).put(
        "x.png", b"png", "image/png", {"model-version": "ci-1"}
    )
    head = s3_server.client().head_object(Bucket=bucket, Key="deep/prefix/x.png")
    assert head["ContentType"] == "image/png"
    assert head["Metadata"] == {"model-version": "ci-1"}


def test_local_put_is_atomic_and_leaves_no_temporary_files(tmp_path):
    sink = LocalSink(tmp_path)
    sink.put("a/b/c.bin", b"1" * 1000)
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["c.bin"]
    # A leftover temporary file from a killed writer is not an object.
    (tmp_path / "a" / "b" / ".c.bin.xyz.tmp").write_bytes(b"partial")
    assert sink.list("a/") == ["a/b/c.bin"]


def test_unknown_bucket_gives_s3_error_code(s3_server, tmp_path):
    sink = S3Sink("no-such-bucket-here", "p", client=s3_server.client())
    with pytest.raises(SinkError) as raised:
        sink.put("k", b"v")
    assert raised.value.code == "NoSuchBucket"
    assert "s3://no-such-bucket-here/p/k" in str(raised.value)
    (tmp_path / "f").write_bytes(b"v")
    with pytest.raises(SinkError, match="NoSuchBucket"):
        sink.put_file("k", tmp_path / "f")
    with pytest.raises(SinkError, match="NoSuchBucket"):
        sink.head_bucket()


def test_unreachable_endpoint_gives_connection_error(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    sink = S3Sink("bucket", endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=2,
                  connect_timeout=1, read_timeout=1)
    with pytest.raises(SinkError) as raised:
        sink.put("k", b"v")
    assert raised.value.code == "ConnectionError"


def test_endpoint_and_credentials_from_environment(s3_env):
    sink = sink_from_uri(f"s3://{s3_env.bucket}/from-env")
    assert isinstance(sink, S3Sink)
    sink.put("k.txt", b"hello")
    assert sink.list() == ["k.txt"]
    assert sink.uri("k.txt") == f"s3://{s3_env.bucket}/from-env/k.txt"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://bucket\n", "not a valid bucket name"),
        ("s3://bucket/a/../b", "'..'"),
        ("s3://bucket/a/\x07b", "control characters"),
        ("gs://bucket/x", "unsupported scheme"),
        ("", "empty"),
        ("/tmp/x\nY", "control characters"),
    ],
)
def test_bad_destinations_are_rejected_with_a_reason(uri, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        sink_from_uri(uri)


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a\\b", "a\x00b", "./a"])
def test_bad_keys_are_rejected(tmp_path, key):
    with pytest.raises(ValueError):
        LocalSink(tmp_path).put(key, b"x")


def test_parse_s3_uri_normalises_prefix():
    assert parse_s3_uri("s3://my-bucket") == ("my-bucket", "")
    assert parse_s3_uri("s3://my-bucket/a/b/") == ("my-bucket", "a/b")
    assert isinstance(sink_from_uri("file:///tmp/somewhere"), LocalSink)


# botocore settings the sinks must leave to boto3's own chain; cleared so the machine's shell or
# ~/.aws/config cannot decide a test.
AWS_SETTINGS = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_RETRY_MODE",
    "AWS_MAX_ATTEMPTS",
    "AWS_DEFAULTS_MODE",
)
# Flexible-checksum headers: what several S3-compatible stores reject.
FLEXIBLE_CHECKSUM = ("x-amz-checksum-", "x-amz-sdk-checksum-algorithm", "x-amz-trailer")


@pytest.fixture
def aws_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An AWS config file of the test's own (empty until written); no AWS_* setting in the environment."""
    for name in AWS_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    return config


def record_sends(client) -> list[tuple[str, dict[str, str]]]:
    """(operation, lower-cased headers) of every HTTP request ``client`` sends from now on, as sent."""
    sent: list[tuple[str, dict[str, str]]] = []

    def before_send(request, event_name: str, **_) -> None:
        headers = {name.lower(): value for name, value in request.headers.items()}
        sent.append((event_name.rsplit(".", 1)[-1], headers))

    client.meta.events.register("before-send.s3", before_send)
    return sent


def checksum_headers(headers: dict[str, str]) -> set[str]:
    return {name for name in headers if name.startswith((*FLEXIBLE_CHECKSUM, "content-md5"))}


def put_through_sink_and_plain_client(s3_env, tmp_path: Path) -> tuple[list, list]:
    """One put and one put_file through an S3Sink, one PutObject through a plain boto3 client."""
    import boto3

    sink = S3Sink(s3_env.bucket, "checksums")
    sink_sent = record_sends(sink.client)
    sink.put("a.png", b"png bytes", "image/png")
    (tmp_path / "b.json").write_bytes(b"{}")
    sink.put_file("b.json", tmp_path / "b.json", "application/json")
    assert sink.get("a.png") == b"png bytes" and sink.get("b.json") == b"{}"  # the server took them
    plain = boto3.session.Session().client("s3")  # a new session: boto3's default one caches old config
    plain_sent = record_sends(plain)
    plain.put_object(Bucket=s3_env.bucket, Key="plain", Body=b"png bytes")
    assert [operation for operation, _ in sink_sent[:2]] == ["PutObject", "PutObject"]
    return sink_sent[:2], plain_sent


@pytest.mark.parametrize("where", ["environment", "profile"])
def test_checksum_opt_out_is_honoured_on_every_upload(where, s3_env, aws_config, tmp_path, monkeypatch):
    if where == "environment":
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    else:
        aws_config.write_text("[default]\nrequest_checksum_calculation = when_required\n")
    sink_sent, plain_sent = put_through_sink_and_plain_client(s3_env, tmp_path)
    for _, headers in sink_sent:
        assert not [name for name in headers if name.startswith(FLEXIBLE_CHECKSUM)], headers
        assert checksum_headers(headers) == checksum_headers(plain_sent[0][1])
    # A file over the transfer threshold (8 MiB) goes up in parts: none of those requests carries them.
    sink = S3Sink(s3_env.bucket, "checksums")
    multipart_sent = record_sends(sink.client)
    (tmp_path / "big.bin").write_bytes(os.urandom(9 << 20))
    sink.put_file("big.bin", tmp_path / "big.bin")
    assert {operation for operation, _ in multipart_sent} >= {"CreateMultipartUpload", "UploadPart"}
    for _, headers in multipart_sent:
        assert not [name for name in headers if name.startswith(FLEXIBLE_CHECKSUM)], headers


def test_checksums_by_default_are_whatever_boto3_sends(s3_env, aws_config, tmp_path):
    sink_sent, plain_sent = put_through_sink_and_plain_client(s3_env, tmp_path)
    for _, headers in sink_sent:
        assert checksum_headers(headers) == checksum_headers(plain_sent[0][1])


def resolved(sink: S3Sink) -> tuple[str, int, float, str]:
    """(retry mode, attempts in all, connect timeout s, region) of the sink's client as built."""
    meta = sink.client.meta
    retries = meta.config.retries
    return retries["mode"], retries["total_max_attempts"], meta.config.connect_timeout, meta.region_name


@pytest.mark.parametrize(
    ("environment", "profile", "arguments", "expected"),
    [
        ({}, "", {}, ("standard", 5, 10.0, "eu-west-1")),
        ({"AWS_RETRY_MODE": "adaptive", "AWS_MAX_ATTEMPTS": "3"}, "", {}, ("adaptive", 3, 10.0, "eu-west-1")),
        (
            {},
            "retry_mode = legacy\nmax_attempts = 7\nregion = ap-south-1",
            {},
            ("legacy", 7, 10.0, "ap-south-1"),
        ),
        ({"AWS_MAX_ATTEMPTS": "4"}, "max_attempts = 7", {}, ("standard", 4, 10.0, "eu-west-1")),
        ({"AWS_REGION": "us-west-2"}, "region = ap-south-1", {}, ("standard", 5, 10.0, "us-west-2")),
        ({"AWS_DEFAULTS_MODE": "in-region"}, "", {}, ("standard", 5, 1.1, "eu-west-1")),
        (
            {"AWS_MAX_ATTEMPTS": "9", "AWS_DEFAULTS_MODE": "in-region", "AWS_REGION": "us-west-2"},
            "",
            {"max_attempts": 2, "connect_timeout": 4.0, "region": "eu-north-1"},
            ("standard", 2, 4.0, "eu-north-1"),
        ),
    ],
    ids=["defaults", "environment", "profile", "environment-over-profile", "aws-region", "defaults-mode",
         "arguments-over-all"],
)
def test_client_settings_follow_the_aws_chain(
    environment, profile, arguments, expected, aws_config, monkeypatch
):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    aws_config.write_text(f"[default]\n{profile}\n")
    if "region = " in profile:
        monkeypatch.delenv("AWS_DEFAULT_REGION")  # else the environment outranks the profile
    assert resolved(S3Sink("bucket", **arguments)) == expected


@pytest.mark.parametrize(
    ("environment", "arguments", "attempts"),
    [({"AWS_MAX_ATTEMPTS": "3"}, {}, 3), ({"AWS_MAX_ATTEMPTS": "3"}, {"max_attempts": 2}, 2)],
)
def test_attempts_counted_on_the_wire(environment, arguments, attempts, aws_config, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    # Port 9 on loopback refuses at once; every attempt is one send.
    sink = S3Sink("bucket", endpoint_url="http://127.0.0.1:9", region="us-east-1", **arguments)
    sent = record_sends(sink.client)
    with pytest.raises(SinkError, match="ConnectionError"):
        sink.put("k", b"v")
    assert len(sent) == attempts


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("AWS_MAX_ATTEMPTS", "lots", "lots"), ("AWS_PROFILE", "no-such-profile", "no-such-profile"),
     ("AWS_RETRY_MODE", "eventually", "eventually")],
)
def test_a_bad_aws_setting_is_named(name, value, message, aws_config, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(SinkError) as raised:
        S3Sink("bucket", region="us-east-1")
    assert raised.value.code == "InvalidConfiguration"
    assert message in str(raised.value) and "AWS_CONFIG_FILE" in str(raised.value)
