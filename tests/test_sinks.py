"""Sinks against a real S3 API (moto server on loopback) and a real directory."""

from __future__ import annotations

import os

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
