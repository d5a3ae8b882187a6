"""Where generated images go: an S3 bucket (boto3) or a local directory, behind one interface.

Both sinks publish whole objects only. A local write goes to a temporary file in the destination
directory and is renamed into place (``os.replace`` is atomic on POSIX), so a reader or a crash never
sees half a file. An S3 write is one PutObject, which S3 applies atomically: the object either exists
with all its bytes or not at all.

Keys are relative, slash-separated paths ("images/00000001_000.png"). Errors from either backend are
raised as :class:`SinkError`, which carries S3's own error code and message (``NoSuchBucket``,
``AccessDenied``, ...), ``ConnectionError`` when the endpoint cannot be reached, or
``InvalidConfiguration`` when the AWS environment or config file cannot make a client.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# S3 bucket naming rules (general-purpose buckets): 3-63 characters, lowercase letters, digits,
# dots and hyphens, starting and ending with a letter or digit.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class SinkError(RuntimeError):
    """A storage operation failed. ``code`` is S3's error code (or ``ConnectionError``/``OSError``)."""

    def __init__(self, operation: str, uri: str, code: str, message: str):
        self.operation = operation
        self.uri = uri
        self.code = code
        self.message = message
        super().__init__(f"{operation} {uri} failed: {code}: {message}")


class SinkKeyNotFound(SinkError, KeyError):
    """``get`` of a key that does not exist."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of its first argument
        return RuntimeError.__str__(self)


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ValueError saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if _CONTROL_CHARS.search(key):
        raise ValueError(f"object key {key!r} contains control characters")
    if key.startswith("/") or "\\" in key:
        raise ValueError(f"object key {key!r} must be a relative path with '/' separators")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"object key {key!r} has an empty, '.' or '..' path segment")
    return key


def validate_prefix(prefix: str) -> str:
    """Normalise an S3 key prefix ("a/b/" -> "a/b"); reject '..', '.', control characters."""
    if _CONTROL_CHARS.search(prefix):
        raise ValueError(f"prefix {prefix!r} contains control characters; remove them")
    stripped = prefix.strip("/")
    if not stripped:
        return ""
    if "\\" in stripped:
        raise ValueError(f"prefix {prefix!r} must use '/' separators, not backslashes")
    for part in stripped.split("/"):
        if part in ("..", "."):
            raise ValueError(f"prefix {prefix!r} contains a {part!r} segment; give a plain path")
        if not part:
            raise ValueError(f"prefix {prefix!r} contains an empty segment ('//')")
    return stripped


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into (bucket, prefix) after checking both."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an S3 URI; write it as s3://bucket/optional/prefix")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket name; write it as s3://bucket/optional/prefix")
    if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"S3 URI {uri!r}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, "
            "dots or hyphens, starting and ending with a letter or digit)"
        )
    return bucket, validate_prefix(prefix)


class Sink(ABC):
    """A flat store of whole objects addressed by relative keys."""

    @abstractmethod
    def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store ``data`` under ``key`` in one atomic step, replacing any previous object; return its uri."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`SinkKeyNotFound` if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_sizes(self, prefix: str = "", start_after: str = "") -> Iterator[tuple[str, int]]:
        """(key, size in bytes) of every object whose key starts with ``prefix``, in key order.

        With ``start_after`` the listing begins after that key (S3 ListObjectsV2 ``StartAfter``), so
        a reader of one key range need not page through everything before it.
        """

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str], content_type: str = "application/octet-stream") -> str:
        """Store a (possibly large) local file under ``key``, as atomically as ``put``; return its uri."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if present (no error when it is already gone)."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """A URI naming ``key`` (or the sink's root), for logs and responses."""

    def list(self, prefix: str = "", start_after: str = "") -> list[str]:
        """Keys starting with ``prefix``, in key order."""
        return [key for key, _ in self.list_sizes(prefix, start_after)]


class LocalSink(Sink):
    """A directory on a local or mounted file system.

    A local directory has no place for content types or user metadata, so ``put`` accepts them for
    interface compatibility and keeps only the bytes; archives record what matters in their manifests.
    """

    def __init__(self, root: str | os.PathLike[str]):
        root_str = os.fspath(root)
        if not root_str or _CONTROL_CHARS.search(root_str):
            raise ValueError(f"local destination {root_str!r} must be a non-empty path without control characters")
        self.root = Path(root_str).expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"local destination {self.root} exists and is not a directory")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def put(self, key, data, content_type="application/octet-stream", metadata=None) -> str:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                with _suppress_os_error():
                    os.unlink(tmp_name)
                raise
        except OSError as error:
            raise SinkError("put", str(path), "OSError", error.strerror or str(error)) from error
        return str(path)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as error:
            raise SinkKeyNotFound("get", str(path), "NoSuchKey", "no such file") from error
        except OSError as error:
            raise SinkError("get", str(path), "OSError", error.strerror or str(error)) from error

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def put_file(self, key, path, content_type="application/octet-stream") -> str:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as handle, open(path, "rb") as source:
                    shutil.copyfileobj(source, handle, 1 << 20)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp_name, target)
            except BaseException:
                with _suppress_os_error():
                    os.unlink(tmp_name)
                raise
        except OSError as error:
            raise SinkError("put", str(target), "OSError", error.strerror or str(error)) from error
        return str(target)

    def list_sizes(self, prefix: str = "", start_after: str = "") -> Iterator[tuple[str, int]]:
        if _CONTROL_CHARS.search(prefix):
            raise ValueError(f"prefix {prefix!r} contains control characters")
        if not self.root.is_dir():
            return iter(())
        # Walk only the directory that contains the prefix, not the whole tree.
        base_dir, _, _ = prefix.rpartition("/")
        start = self.root.joinpath(*base_dir.split("/")) if base_dir else self.root
        found: list[tuple[str, int]] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root).replace(os.sep, "/")
            for name in filenames:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue  # an interrupted put's temporary file is not an object
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix) and key > start_after:
                    found.append((key, os.path.getsize(os.path.join(dirpath, name))))
        found.sort()
        return iter(found)

    def delete(self, key: str) -> None:
        with _suppress_os_error(FileNotFoundError):
            self._path(key).unlink()

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)

    def __repr__(self) -> str:
        return f"LocalSink({str(self.root)!r})"


class _suppress_os_error:
    def __init__(self, kind: type[OSError] = OSError):
        self.kind = kind

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, self.kind)


# The sinks' defaults, installed as the lowest rung of botocore's own configuration chain
# (botocore.session.Session(session_vars=...)): an AWS_* environment variable, a setting of the active
# profile in the AWS config file, or AWS_DEFAULTS_MODE still wins, exactly as for any other boto3 client.
# Everything else (checksums, addressing style, CA bundle, ...) is left to botocore entirely.
_DEFAULT_RETRY_MODE = "standard"  # botocore 1.34, the declared floor, defaults to "legacy"
_DEFAULT_MAX_ATTEMPTS = 5  # attempts in all, the first included (AWS_MAX_ATTEMPTS's meaning)
_DEFAULT_CONNECT_TIMEOUT_S = 10.0  # botocore's own is 60 s: an unreachable endpoint should fail sooner


def _botocore_session() -> Any:
    """A botocore session whose built-in defaults are the sinks' (see above); nothing is forced."""
    import botocore.session

    builtin = botocore.session.Session.SESSION_VARIABLES
    retry_name, retry_env, _, retry_cast = builtin["retry_mode"]
    attempts_name, attempts_env, _, attempts_cast = builtin["max_attempts"]
    region_name, region_env, region_default, region_cast = builtin["region"]
    region_envs = [region_env] if isinstance(region_env, str) else list(region_env)
    return botocore.session.Session(
        session_vars={
            "retry_mode": (retry_name, retry_env, _DEFAULT_RETRY_MODE, retry_cast),
            "max_attempts": (attempts_name, attempts_env, _DEFAULT_MAX_ATTEMPTS, attempts_cast),
            # botocore reads only AWS_DEFAULT_REGION; AWS_REGION, which the other AWS SDKs and most
            # container platforms set, ranks above it, both still above the profile's region.
            "region": (region_name, ["AWS_REGION", *region_envs], region_default, region_cast),
            # Not read from the environment or a profile by botocore; AWS_DEFAULTS_MODE may set it.
            "connect_timeout": (None, None, _DEFAULT_CONNECT_TIMEOUT_S, None),
        }
    )


class S3Sink(Sink):
    """A bucket and key prefix on S3 or an S3-compatible store (MinIO, Ceph, moto).

    The client is configured the way any boto3 client is: credentials, region, endpoint
    (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``), checksums (``AWS_REQUEST_CHECKSUM_CALCULATION``,
    ``AWS_RESPONSE_CHECKSUM_VALIDATION``), retries and every other setting come from botocore's chain
    of ``AWS_*`` environment variables, the active profile of the AWS config file, and instance or
    workload identity. The sinks change only botocore's built-in defaults, which that chain overrides:
    ``standard`` retry mode, 5 attempts in all, a 10 s connect timeout, and ``AWS_REGION`` read before
    ``AWS_DEFAULT_REGION``. Arguments given here win over all of these.

    Args:
        endpoint_url, region: the S3 endpoint and region.
        client: a ready boto3 S3 client to use instead of building one.
        connect_timeout, read_timeout: seconds.
        max_attempts: attempts per request in all, the first included (as ``AWS_MAX_ATTEMPTS``).

    Raises:
        ValueError: a bucket name S3 does not accept, or a prefix with '.', '..' or empty segments.
        SinkError: code ``InvalidConfiguration`` when botocore cannot build a client from the
            environment and config file (an unknown profile, a malformed ``AWS_*`` value).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any | None = None,
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_attempts: int | None = None,
    ):
        if not bucket or not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name")
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.client = client if client is not None else self._make_client(
            endpoint_url, region, connect_timeout, read_timeout, max_attempts
        )

    def _make_client(
        self,
        endpoint_url: str | None,
        region: str | None,
        connect_timeout: float | None,
        read_timeout: float | None,
        max_attempts: int | None,
    ) -> Any:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        # Only what the caller asked for goes into Config: a key set there overrides the AWS_*
        # variables and the profile for that setting, which is the caller's choice to make, not ours.
        # connect_timeout is the exception that is always passed: Config's own default (60 s) would
        # hide the session's, while None tells botocore to look it up (10 s, or AWS_DEFAULTS_MODE's).
        explicit: dict[str, Any] = {"connect_timeout": connect_timeout}
        if read_timeout is not None:
            explicit["read_timeout"] = read_timeout
        if max_attempts is not None:
            if max_attempts < 1:
                raise ValueError(f"max_attempts must be at least 1 (the first attempt), got {max_attempts}")
            # "total_max_attempts", not "max_attempts": Config's max_attempts counts retries only.
            explicit["retries"] = {"total_max_attempts": int(max_attempts)}
        try:
            return boto3.session.Session(botocore_session=_botocore_session()).client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=Config(**explicit)
            )
        except (BotoCoreError, ValueError) as error:  # ValueError: botocore's int() of AWS_MAX_ATTEMPTS etc.
            raise SinkError(
                "configure",
                self.uri(),
                "InvalidConfiguration",
                f"{type(error).__name__}: {error}; check the AWS_* environment variables and the active "
                "profile in the AWS config file (AWS_CONFIG_FILE, default ~/.aws/config)",
            ) from error

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, operation: str, key: str, error: Exception) -> SinkError:
        from botocore.exceptions import ClientError, NoCredentialsError

        uri = self.uri(key)
        if not isinstance(error, (ClientError, NoCredentialsError)) and isinstance(error.__cause__, ClientError):
            error = error.__cause__  # boto3's transfer manager wraps the S3 error in S3UploadFailedError
        if isinstance(error, ClientError):
            details = error.response.get("Error", {})
            code = str(details.get("Code") or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            message = details.get("Message") or str(error)
            if code == "403":  # HEAD responses carry no error body, only the status
                code, message = "AccessDenied", "access denied (HTTP 403)"
            if code in ("NoSuchKey", "404", "NotFound"):
                return SinkKeyNotFound(operation, uri, "NoSuchKey", message or "no such key")
            return SinkError(operation, uri, code, message)
        if isinstance(error, NoCredentialsError):
            return SinkError(operation, uri, "NoCredentials", "no AWS credentials found in the standard chain")
        return SinkError(operation, uri, "ConnectionError", f"{type(error).__name__}: {error}")

    def _call(self, operation: str, key: str, fn, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as error:
            raise self._translate(operation, key, error) from error

    def put(self, key, data, content_type="application/octet-stream", metadata=None) -> str:
        self._call(
            "put",
            key,
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ContentType=content_type,
            Metadata={str(k): str(v) for k, v in (metadata or {}).items()},
        )
        return self.uri(key)

    def get(self, key: str) -> bytes:
        response = self._call("get", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return response["Body"].read()

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except SinkKeyNotFound:
            return False
        return True

    def head_bucket(self) -> None:
        """Raise :class:`SinkError` unless the bucket exists and these credentials may use it."""
        try:
            self._call("head bucket", "", self.client.head_bucket, Bucket=self.bucket)
        except SinkKeyNotFound as error:  # HEAD responses carry no error body, only the status
            raise SinkError("head bucket", self.uri(), "NoSuchBucket", "the bucket does not exist") from error

    def put_file(self, key, path, content_type="application/octet-stream") -> str:
        # upload_file switches to a multipart upload for large files; S3 shows the object only once
        # CompleteMultipartUpload succeeds, so readers never see part of it.
        self._call(
            "put",
            key,
            self.client.upload_file,
            Filename=os.fspath(path),
            Bucket=self.bucket,
            Key=self._key(key),
            ExtraArgs={"ContentType": content_type},
        )
        return self.uri(key)

    def list_sizes(self, prefix: str = "", start_after: str = "") -> Iterator[tuple[str, int]]:
        if _CONTROL_CHARS.search(prefix):
            raise ValueError(f"prefix {prefix!r} contains control characters")
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        extra = {"StartAfter": f"{self.prefix}/{start_after}" if self.prefix else start_after} if start_after else {}
        pages = paginator.paginate(Bucket=self.bucket, Prefix=full_prefix, **extra)
        iterator = iter(pages)
        while True:
            page = self._call("list", prefix, lambda: next(iterator, None))
            if page is None:
                return
            for item in page.get("Contents", ()):
                yield item["Key"][strip:], int(item["Size"])

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def uri(self, key: str = "") -> str:
        path = "/".join(part for part in (self.prefix, key) if part)
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Sink({self.uri()!r})"


def sink_from_uri(uri: str, **s3_options: Any) -> Sink:
    """``s3://bucket/prefix`` -> :class:`S3Sink`; ``file:///dir`` or a plain path -> :class:`LocalSink`."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("destination is empty; give s3://bucket/prefix or a local directory")
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        return S3Sink(bucket, prefix, **s3_options)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    if scheme and scheme.group(1).lower() != "file":
        raise ValueError(
            f"destination {uri!r} uses the unsupported scheme {scheme.group(1)!r}; "
            "give s3://bucket/prefix or a local directory"
        )
    path = uri.removeprefix("file://")
    if _CONTROL_CHARS.search(path):
        raise ValueError(f"local destination {path!r} contains control characters")
    return LocalSink(path)
