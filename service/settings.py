"""Service settings, read once from environment variables (all optional).

| variable | default | meaning |
| --- | --- | --- |
| `CXRSYNTH_BUNDLE` | unset | model bundle directory (the embedded default); unset: the BentoML model `CXRSYNTH_MODEL_TAG` |
| `CXRSYNTH_MODEL_TAG` | `cxrsynth:latest` | bundle in the BentoML model store, packaged by `bentoml build` |
| `CXRSYNTH_API_TOKEN` | unset | bearer token required on the API; unset: the API is open |
| `CXRSYNTH_MAX_COUNT` | 16 | most images one request may ask for |
| `CXRSYNTH_MAX_BODY_BYTES` | 65536 | largest request body accepted |
| `CXRSYNTH_MAX_BATCH` | 64 | most samples in one LCO batch |
| `CXRSYNTH_COMPUTE_BATCH` | 0 | rows per ONNX Runtime call, fixed for the process (0: 1 on the CPU, 16 on CUDA); an image depends on it, so replicas that must agree share it |
| `CXRSYNTH_BATCH_WAIT_MS` | 10 | how long an idle batcher waits for more requests before starting |
| `CXRSYNTH_BATCHING` | 1 | 0 runs each request's samples on their own (no cross-request batching) |
| `CXRSYNTH_MAX_RETRIES` | 8 | most retries per image a `strict` request may ask for |
| `CXRSYNTH_S3_CONCURRENCY` | 4 | uploads in flight per request |
| `CXRSYNTH_GPUS` | 0 | GPUs the service declares in its BentoML resources (onnxruntime-gpu uses the first) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "CXRSYNTH_"


def _int(name: str, default: int, low: int, high: int) -> int:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ValueError(f"{ENV_PREFIX}{name}={value} is out of range; use {low}..{high}")
    return value


@dataclass(frozen=True)
class Settings:
    bundle_dir: Path | None
    model_tag: str
    api_token: str | None
    max_count: int
    max_body_bytes: int
    max_batch: int
    compute_batch: int | None  # None: the engine's default for its execution provider
    batch_wait_ms: int
    batching: bool
    max_retries: int
    s3_concurrency: int
    gpus: int

    @classmethod
    def from_env(cls) -> Settings:
        bundle = os.environ.get(ENV_PREFIX + "BUNDLE", "").strip()
        token = os.environ.get(ENV_PREFIX + "API_TOKEN", "").strip()
        return cls(
            bundle_dir=Path(bundle).expanduser().resolve() if bundle else None,
            model_tag=os.environ.get(ENV_PREFIX + "MODEL_TAG", "cxrsynth:latest").strip(),
            api_token=token or None,
            max_count=_int("MAX_COUNT", 16, 1, 10_000),
            max_body_bytes=_int("MAX_BODY_BYTES", 65_536, 1_024, 64 * 1024 * 1024),
            max_batch=_int("MAX_BATCH", 64, 1, 4_096),
            compute_batch=_int("COMPUTE_BATCH", 0, 0, 4_096) or None,
            batch_wait_ms=_int("BATCH_WAIT_MS", 10, 0, 10_000),
            batching=_int("BATCHING", 1, 0, 1) == 1,
            max_retries=_int("MAX_RETRIES", 8, 0, 100),
            s3_concurrency=_int("S3_CONCURRENCY", 4, 1, 64),
            gpus=_int("GPUS", 0, 0, 16),
        )
