"""Merge the shards of an archive: check everything, write the NIH CSV, then the commit marker.

The merge streams: chunk manifests are read in index order and joined against one sorted listing of
``images/``, so memory does not depend on the archive's size. It refuses to commit an archive with a
missing chunk, a record whose image is absent or of the wrong size (or, with ``verify_images``, the
wrong sha256), or an image that no record names.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from service.archive.manifest import (
    CSV_KEY,
    JOB_KEY,
    MARKER_KEY,
    PAIRS_CSV_KEY,
    ArchiveError,
    ArchiveIncomplete,
    LabelCounter,
    canonical_json,
    csv_header,
    csv_row,
    decode_records,
    is_dropped,
    marker_document,
    sha256_hex,
    stored_files,
)
from service.archive.pairs import pairs_csv_header, pairs_csv_row
from service.archive.spec import ArchivePlan, ArchiveSpec
from service.sinks import Sink, SinkError, SinkKeyNotFound

_EXAMPLES = 5  # problems quoted in an error message


def read_job(sink: Sink) -> tuple[dict[str, Any], ArchivePlan]:
    try:
        job = json.loads(sink.get(JOB_KEY))
    except SinkKeyNotFound:
        raise ArchiveError(f"{sink.uri()} holds no archive ({JOB_KEY} is missing); run its shards first") from None
    except ValueError as error:
        raise ArchiveError(f"{sink.uri(JOB_KEY)} is not valid JSON: {error}") from None
    spec = ArchiveSpec(**job["spec"], destination=sink.uri())
    return job, ArchivePlan(spec)


@dataclass
class ArchiveStatus:
    destination: str
    images: int
    chunks_total: int
    chunks_present: int
    shards_incomplete: list[int]
    complete: bool  # the commit marker exists

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def archive_status(sink: Sink) -> ArchiveStatus:
    """Which shards still lack chunk manifests, and whether the archive is committed."""
    _, plan = read_job(sink)
    present = set(sink.list("manifests/"))
    total = found = 0
    incomplete = []
    for shard in range(plan.spec.shard_count):
        keys = [plan.chunk_key(shard, n) for n in range(len(plan.chunks(shard)))]
        have = sum(key in present for key in keys)
        total, found = total + len(keys), found + have
        if have < len(keys):
            incomplete.append(shard)
    return ArchiveStatus(sink.uri(), plan.count, total, found, incomplete, sink.exists(MARKER_KEY))


class _ImageListing:
    """A cursor over the sorted ``images/`` listing, for a merge-join with records in index order."""

    def __init__(self, listing: Iterator[tuple[str, int]]):
        self._listing = listing
        self._head = next(listing, None)
        self.total_bytes = 0

    def take(self, key: str, orphans: list[str]) -> int | None:
        """Size of ``key`` (None when absent); keys passed over on the way have no record."""
        while self._head is not None and self._head[0] < key:
            orphans.append(self._head[0])
            self._head = next(self._listing, None)
        if self._head is None or self._head[0] != key:
            return None
        size = self._head[1]
        self.total_bytes += size
        self._head = next(self._listing, None)
        return size

    def rest(self) -> list[str]:
        left = [] if self._head is None else [self._head[0]]
        left += [key for key, _ in self._listing]
        return left


def merge_archive(
    sink: Sink,
    *,
    verify_images: bool = False,
    wait_seconds: float = 0.0,
    poll_seconds: float = 30.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Check all shards, write Data_Entry.csv and, last, the commit marker; return the marker.

    With ``wait_seconds`` the merge first waits that long for missing chunks to appear (the
    Kubernetes merge Job starts beside the shard pods and waits for them).
    """
    try:
        job, plan = read_job(sink)
        _wait_for_shards(sink, plan, wait_seconds, poll_seconds)
        merged = _MergedRecords(sink, plan, int(job["model"]["resolution"]), verify_images)
        paths = []
        try:
            for _ in range(2):
                with tempfile.NamedTemporaryFile("wb", suffix=".csv", delete=False) as csv_file:
                    paths.append(csv_file.name)
            with open(paths[0], "wb") as csv_file, open(paths[1], "wb") as pairs_file:
                merged.write_csv(csv_file, pairs_file, progress)
            merged.raise_on_problems()
            sink.put_file(CSV_KEY, paths[0], "text/csv")
            if plan.spec.pairs is not None:
                sink.put_file(PAIRS_CSV_KEY, paths[1], "text/csv")
        finally:
            for path in paths:
                os.unlink(path)
        marker = marker_document(
            job=job,
            counter=merged.counter,
            shard_count=plan.spec.shard_count,
            manifests=merged.manifests,
            csv_sha256=merged.csv_hash.hexdigest(),
            image_bytes=merged.images.total_bytes,
            pairs_csv_sha256=merged.pairs_csv_hash.hexdigest() if plan.spec.pairs is not None else None,
        )
        sink.put(MARKER_KEY, canonical_json(marker), "application/json")
        return marker
    except SinkError as error:
        raise ArchiveError(f"storage failed during merge: {error}; run the merge again") from error


def _wait_for_shards(sink: Sink, plan: ArchivePlan, wait_seconds: float, poll_seconds: float) -> None:
    """Return once every chunk manifest exists; ArchiveIncomplete naming the shards to finish after
    ``wait_seconds``."""
    deadline = time.monotonic() + wait_seconds
    while True:
        status = archive_status(sink)
        if not status.shards_incomplete:
            return
        if time.monotonic() >= deadline:
            shards = ", ".join(str(s) for s in status.shards_incomplete[:20])
            raise ArchiveIncomplete(
                f"{status.chunks_total - status.chunks_present} of {status.chunks_total} chunk manifests are "
                f"missing at {sink.uri()}; finish shard(s) {shards} of {plan.spec.shard_count} "
                "(rerun them with the same spec), then merge again"
            )
        time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())) or 0.01)


class _MergedRecords:
    """Every chunk's records read in index order, checked against the stored images, into the CSV."""

    def __init__(self, sink: Sink, plan: ArchivePlan, resolution: int, verify_images: bool):
        self.sink, self.plan, self.resolution, self.verify_images = sink, plan, resolution, verify_images
        self.counter = LabelCounter()
        self.manifests: dict[str, str] = {}  # chunk key -> sha256
        self.problems: list[str] = []
        self.orphans: list[str] = []
        self.images = _ImageListing(sink.list_sizes("images/"))
        # A pairs job's difference maps, joined the same way; an ordinary job lists nothing more.
        self.differences = _ImageListing(sink.list_sizes("differences/") if plan.spec.pairs else iter(()))
        self.csv_hash = hashlib.sha256()
        self.pairs_csv_hash = hashlib.sha256()

    def write_csv(self, csv_file: BinaryIO, pairs_file: BinaryIO, progress: bool) -> None:
        """Data_Entry.csv to ``csv_file`` (one row per stored image) and, in a pairs job, Pairs.csv to
        ``pairs_file`` (one row per pair kept)."""
        from tqdm import tqdm

        self._write(csv_file, csv_header())
        self._write_pair(pairs_file, pairs_csv_header())
        with tqdm(total=self.plan.count, unit="img", desc="merge", disable=not progress, dynamic_ncols=True) as bar:
            for shard in range(self.plan.spec.shard_count):
                for number, chunk in enumerate(self.plan.chunks(shard)):
                    records = self._chunk_records(self.plan.chunk_key(shard, number), chunk)
                    for record in records:
                        self.counter.add_pairs(record)
                        if is_dropped(record):  # no image, no row: the auditor rejected it through every retry
                            self.counter.add_dropped(record)
                            continue
                        self._check_files(record)
                        for image in [record, *(p for p in record.get("pairs", []) if not is_dropped(p))]:
                            self.counter.add(image)
                            self._write(csv_file, csv_row(image, self.resolution))
                            if image is not record:
                                self._write_pair(pairs_file, pairs_csv_row(record, image))
                    bar.update(len(records))
        self.orphans += self.images.rest() + self.differences.rest()

    def raise_on_problems(self) -> None:
        if self.problems:
            raise ArchiveIncomplete(
                f"{len(self.problems)} problem(s) at {self.sink.uri()}: {'; '.join(self.problems[:_EXAMPLES])}. "
                "Rerun the shards concerned (they repair what is missing), then merge again"
            )
        if self.orphans:
            raise ArchiveError(
                f"{len(self.orphans)} object(s) under {self.sink.uri('images')} have no manifest record "
                f"(e.g. {', '.join(self.orphans[:_EXAMPLES])}); they do not belong to this job: remove them"
            )

    def _write(self, csv_file: BinaryIO, data: bytes) -> None:
        csv_file.write(data)
        self.csv_hash.update(data)

    def _write_pair(self, pairs_file: BinaryIO, data: bytes) -> None:
        pairs_file.write(data)
        self.pairs_csv_hash.update(data)

    def _chunk_records(self, key: str, chunk: range) -> list[dict[str, Any]]:
        """The chunk's records, or none (with the problem noted) when its manifest is unusable."""
        data = self.sink.get(key)
        self.manifests[key] = sha256_hex(data)
        try:
            records = decode_records(data, self.sink.uri(key))
        except ArchiveError as error:
            self.problems.append(str(error))
            return []
        if [record["index"] for record in records] != list(chunk):
            self.problems.append(f"{key} does not list exactly images {chunk.start}..{chunk.stop - 1}")
            return []
        return records

    def _check_files(self, record: dict[str, Any]) -> None:
        """Every file the record names is stored with its recorded size (and sha256, with verify_images)."""
        for key, expected, digest in stored_files(record):
            listing = self.differences if key.startswith("differences/") else self.images
            size = listing.take(key, self.orphans)
            if size is None:
                self.problems.append(f"{key} is missing")
            elif size != expected:
                self.problems.append(f"{key} has {size} bytes, its record says {expected}")
            elif self.verify_images and sha256_hex(self.sink.get(key)) != digest:
                self.problems.append(f"{key} does not match its sha256")
