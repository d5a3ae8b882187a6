"""Archive jobs: many labelled synthetic x-rays written to S3 or a directory, resumable and shardable.

- :mod:`service.archive.spec`      the job spec and its deterministic per-index plan
- :mod:`service.archive.runner`    one shard: LCO, then PNG or DICOM + upload in a bounded pool, chunk manifests
- :mod:`service.archive.merge`     checks every shard, writes Data_Entry.csv, then the commit marker
- :mod:`service.archive.manifest`  the files besides the images, and the NIH CSV columns
- :mod:`service.archive.pairs`     counterfactual pairs: each reference's edits, their records, Pairs.csv
- :mod:`service.archive.tasks`     the BentoML task endpoints' logic
- ``python -m service.archive``    the command line (run, merge, status)
"""

from service.archive.manifest import ArchiveConflict, ArchiveError, ArchiveIncomplete
from service.archive.merge import archive_status, merge_archive
from service.archive.runner import ArchiveCancelled, ModelInfo, RunOptions, ShardReport, run_shard
from service.archive.spec import ArchivePlan, ArchiveSpec, LabelGroup

__all__ = [
    "ArchiveCancelled",
    "ArchiveConflict",
    "ArchiveError",
    "ArchiveIncomplete",
    "ArchivePlan",
    "ArchiveSpec",
    "LabelGroup",
    "ModelInfo",
    "RunOptions",
    "ShardReport",
    "archive_status",
    "merge_archive",
    "run_shard",
]
