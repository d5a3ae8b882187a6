"""The service's own Prometheus metrics, served on /metrics beside BentoML's.

BentoML runs prometheus_client in multiprocess mode and sets ``PROMETHEUS_MULTIPROC_DIR`` when a
worker starts, after the service module is imported; prometheus_client picks its storage when it is
first imported. So this module imports it only inside :func:`create_metrics`, which the service
calls from its constructor.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from service.labels import NO_FINDING

STEP_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServiceMetrics:
    images: Any  # Counter{finding, satisfied}
    lco_steps: Any  # Histogram
    satisfied_ratio: Any  # Gauge
    s3_upload_seconds: Any  # Histogram
    s3_upload_errors: Any  # Counter{code}
    lco_batch_size: Any  # Histogram
    near_copies_dropped: Any  # Counter{source}
    accepted_without_steps: Any  # Counter{source}
    edits: Any  # Counter{outcome}
    verifications: Any  # Counter{finding, verified, source}
    _lock: threading.Lock
    _seen: int = 0
    _satisfied: int = 0

    def record_image(self, positives: list[str], constrained: bool, satisfied: bool, steps: int,
                     accepted_without_steps: bool) -> None:
        """Count one returned image under each requested finding ("No Finding" / "unconditional")."""
        for finding in requested_findings(positives, constrained):
            self.images.labels(finding=finding, satisfied=str(satisfied).lower()).inc()
        self.lco_steps.observe(steps)
        if accepted_without_steps:
            self.accepted_without_steps.labels(source="generate").inc()
        with self._lock:
            self._seen += 1
            self._satisfied += int(satisfied)
            self.satisfied_ratio.set(self._satisfied / self._seen)

    def record_verification(self, positives: list[str], constrained: bool, verified: bool, source: str) -> None:
        """Count one auditor verdict (service/verify.py) under each requested finding: verified, or
        rejected (the image is made again or, past the bound, kept or dropped unverified)."""
        for finding in requested_findings(positives, constrained):
            self.verifications.labels(finding=finding, verified=str(verified).lower(), source=source).inc()


def requested_findings(positives: list[str], constrained: bool) -> list[str]:
    """The findings a request is counted under: its present ones, else "No Finding" or "unconditional"."""
    return positives or [NO_FINDING if constrained else "unconditional"]


def create_metrics() -> ServiceMetrics:
    import prometheus_client as prom  # after BentoML has set PROMETHEUS_MULTIPROC_DIR

    return ServiceMetrics(
        images=prom.Counter(
            "cxrsynth_images", "Images returned, by requested finding and whether LCO satisfied it",
            ["finding", "satisfied"],
        ),
        lco_steps=prom.Histogram("cxrsynth_lco_steps", "Adam steps LCO took per returned image", buckets=STEP_BUCKETS),
        satisfied_ratio=prom.Gauge(
            "cxrsynth_satisfied_ratio", "Share of returned images whose constraints were all satisfied",
            multiprocess_mode="mostrecent",
        ),
        s3_upload_seconds=prom.Histogram(
            "cxrsynth_s3_upload_seconds", "Seconds per S3 object upload (PNG or sidecar)", buckets=UPLOAD_BUCKETS
        ),
        s3_upload_errors=prom.Counter("cxrsynth_s3_upload_errors", "Failed S3 uploads by S3 error code", ["code"]),
        lco_batch_size=prom.Histogram(
            "cxrsynth_lco_batch_size", "Samples in the running LCO batch at each step", buckets=BATCH_BUCKETS
        ),
        near_copies_dropped=prom.Counter(
            "cxrsynth_near_copies_dropped", "Images dropped as near-copies of the training set and replaced",
            ["source"],  # "generate" or "archive"
        ),
        accepted_without_steps=prom.Counter(
            "cxrsynth_lco_accepted_without_steps",
            "Images returned as a scored latent that already met the request at the LCO margin (rejection first)",
            ["source"],  # "generate" or "archive"
        ),
        edits=prom.Counter("cxrsynth_edits", "POST /edit pairs made, by whether the edited image met the change",
                           ["outcome"]),  # "satisfied" or "unsatisfied"
        verifications=prom.Counter(
            "cxrsynth_verifications", "Auditor verdicts on LCO images by requested finding: verified=false is a "
            "rejection", ["finding", "verified", "source"],  # source: "generate" or "archive"
        ),
        _lock=threading.Lock(),
    )
