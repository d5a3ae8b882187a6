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
from typing import Any

from service.archive.manifest import (
    CSV_KEY,
    JOB_KEY,
    MARKER_KEY,
    ArchiveError,
    ArchiveIncomplete,
    LabelCounter,
    canonical_json,
    csv_header,
    csv_row,
    decode_records,
    marker_document,
    sha256_hex,
)
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
    from tqdm import tqdm

    try:
        job, plan = read_job(sink)
        deadline = time.monotonic() + wait_seconds
        while True:
            status = archive_status(sink)
            if not status.shards_incomplete:
                break
            if time.monotonic() >= deadline:
                shards = ", ".join(str(s) for s in status.shards_incomplete[:20])
                raise ArchiveIncomplete(
                    f"{status.chunks_total - status.chunks_present} of {status.chunks_total} chunk manifests are "
                    f"missing at {sink.uri()}; finish shard(s) {shards} of {plan.spec.shard_count} "
                    "(rerun them with the same spec), then merge again"
                )
            time.sleep(min(poll_seconds, max(0.0, deadline - time.monotonic())) or 0.01)

        resolution = int(job["model"]["resolution"])
        counter = LabelCounter()
        manifests: dict[str, str] = {}
        problems: list[str] = []
        orphans: list[str] = []
        images = _ImageListing(sink.list_sizes("images/"))
        bar = tqdm(total=plan.count, unit="img", desc="merge", disable=not progress, dynamic_ncols=True)
        csv_hash = hashlib.sha256()
        with tempfile.NamedTemporaryFile("wb", suffix=".csv", delete=False) as csv_file:
            csv_path = csv_file.name
            try:
                header = csv_header()
                csv_file.write(header)
                csv_hash.update(header)
                for shard in range(plan.spec.shard_count):
                    for number, chunk in enumerate(plan.chunks(shard)):
                        key = plan.chunk_key(shard, number)
                        data = sink.get(key)
                        manifests[key] = sha256_hex(data)
                        try:
                            records = decode_records(data, sink.uri(key))
                        except ArchiveError as error:
                            problems.append(str(error))
                            continue
                        if [record["index"] for record in records] != list(chunk):
                            problems.append(f"{key} does not list exactly images {chunk.start}..{chunk.stop - 1}")
                            continue
                        for record in records:
                            size = images.take(record["image"], orphans)
                            if size is None:
                                problems.append(f"{record['image']} is missing")
                            elif size != record["bytes"]:
                                problems.append(f"{record['image']} has {size} bytes, its record says {record['bytes']}")
                            elif verify_images and sha256_hex(sink.get(record["image"])) != record["sha256"]:
                                problems.append(f"{record['image']} does not match its sha256")
                            counter.add(record)
                            row = csv_row(record, resolution)
                            csv_file.write(row)
                            csv_hash.update(row)
                        bar.update(len(records))
                csv_file.close()
                bar.close()
                orphans += images.rest()
                if problems:
                    raise ArchiveIncomplete(
                        f"{len(problems)} problem(s) at {sink.uri()}: {'; '.join(problems[:_EXAMPLES])}. "
                        "Rerun the shards concerned (they repair what is missing), then merge again"
                    )
                if orphans:
                    raise ArchiveError(
                        f"{len(orphans)} object(s) under {sink.uri('images')} have no manifest record "
                        f"(e.g. {', '.join(orphans[:_EXAMPLES])}); they do not belong to this job: remove them"
                    )
                sink.put_file(CSV_KEY, csv_path, "text/csv")
            finally:
                bar.close()
                os.unlink(csv_path)
        marker = marker_document(
            job=job,
            counter=counter,
            shard_count=plan.spec.shard_count,
            manifests=manifests,
            csv_sha256=csv_hash.hexdigest(),
            image_bytes=images.total_bytes,
        )
        sink.put(MARKER_KEY, canonical_json(marker), "application/json")
        return marker
    except SinkError as error:
        raise ArchiveError(f"storage failed during merge: {error}; run the merge again") from error
