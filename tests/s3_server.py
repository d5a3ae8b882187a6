"""A real S3 API for tests: moto's server mode in a subprocess on 127.0.0.1.

Register with ``pytest_plugins = ["tests.s3_server"]``. Fixtures:

- ``s3_server`` (session): one shared server; ``s3_server.endpoint_url``, ``s3_server.env`` (fake
  credentials, region and endpoint for subprocesses), ``s3_server.client()``, ``s3_server.new_bucket()``.
- ``s3_env`` (function): the server's variables set in ``os.environ`` for code that builds its own
  boto3 clients, and a fresh empty bucket name as ``s3_env.bucket``.
- ``private_s3_server`` (function): a server of its own, for tests that pause it with
  ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT: the process keeps its objects, as a real S3 outage
  keeps the bucket, while connections to it time out).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import closing

import pytest

from service.processes import spawn

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoS3Server:
    """One ``moto.server`` subprocess bound to a free loopback port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.env = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoS3Server:
        self.process = spawn(  # ends with the test run, however that ends
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **FAKE_CREDENTIALS},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.process.returncode} at start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not listen on port {self.port} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server: connections are accepted by the kernel but never answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
            config=Config(**config) if config else None,
        )

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def private_s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server().start()
    try:
        yield server
    finally:
        server.stop()


class S3Env(dict):
    """The environment variables of a server, plus a fresh bucket made for this test."""

    bucket: str
    endpoint_url: str


@pytest.fixture()
def s3_env(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    env = S3Env(s3_server.env)
    env.bucket = s3_server.new_bucket()
    env.endpoint_url = s3_server.endpoint_url
    return env
