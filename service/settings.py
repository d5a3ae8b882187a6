"""Service settings: one pydantic-settings model, read once from ``CXRSYNTH_*`` environment variables
(all optional). Each field's description is its documentation; ``python -m service.settings`` prints
them as a table with the values in force.

A value that does not parse or is out of its bounds stops the service at start-up with
:class:`SettingsError`, naming the variable and what it accepts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CXRSYNTH_"


class SettingsError(ValueError):
    """A ``CXRSYNTH_*`` variable that cannot be used; the message names each one and what it takes."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore")

    bundle: Path | None = Field(
        None, description="model bundle directory (the embedded default); unset: the BentoML model MODEL_TAG")
    model_tag: str = Field("cxrsynth:latest", description="bundle in the BentoML model store, packaged by `bentoml build`")
    api_token: str | None = Field(None, description="bearer token required on the API; unset: the API is open")
    max_count: int = Field(16, ge=1, le=10_000, description="most images one request may ask for")
    max_body_bytes: int = Field(65_536, ge=1_024, le=64 * 1024 * 1024, description="largest request body accepted")
    max_batch: int = Field(64, ge=1, le=4_096, description="most samples in one running LCO batch")
    compute_batch: int = Field(
        0, ge=0, le=4_096,
        description="rows per ONNX Runtime call, fixed for the process (0: 1 on the CPU, 16 on CUDA); an image "
        "depends on it, so replicas that must agree share it")
    parallel_chunks: int = Field(
        0, ge=0, le=256,
        description="ONNX Runtime calls of one LCO pass run side by side (0: one per CPU on the CPU, 1 on CUDA); "
        "images do not depend on it")
    batch_wait_ms: int = Field(10, ge=0, le=10_000,
                               description="how long an idle batcher waits for more requests before starting")
    batching: bool = Field(True, description="false runs each request's samples on their own (no cross-request batching)")
    max_retries: int = Field(8, ge=0, le=100, description="most retries per image a `strict` request may ask for")
    s3_concurrency: int = Field(4, ge=1, le=64, description="uploads in flight per request")
    gpus: int = Field(0, ge=0, le=16,
                      description="GPUs the service declares in its BentoML resources (onnxruntime-gpu uses the first)")
    port: int = Field(3000, ge=1, le=65_535, description="port `python -m service.demo` serves on (its --port wins)")
    demo_bundle: Path | None = Field(None, description="bundle `python -m service.demo` serves (default models/demo)")
    near_copy_index: Path | None = Field(
        None, description="the training set's near-copy index (.npz, `python -m training.evaluate.memorisation "
        "index`); unset: requests and archive jobs cannot ask to drop near-copies")
    archive_local_root: Path | None = Field(
        None, description="the one local directory tree archive tasks may write under; unset: s3:// only")

    @field_validator("bundle", "demo_bundle", "archive_local_root", "near_copy_index")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return path.expanduser().resolve() if path is not None else None

    @field_validator("api_token")
    @classmethod
    def _stripped(cls, token: str | None) -> str | None:
        return token.strip() or None if token is not None else None

    @classmethod
    def from_env(cls) -> Settings:
        """The settings in force; SettingsError names every bad variable."""
        try:
            return cls()
        except ValidationError as error:
            problems = [f"{ENV_PREFIX}{str(e['loc'][0]).upper()}: {e['msg']} (got {e.get('input')!r})"
                        for e in error.errors()]
            raise SettingsError("bad service settings; fix or unset: " + "; ".join(problems)) from None


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process's settings, read once."""
    return Settings.from_env()


def describe() -> str:
    """The variables as a Markdown table: name, value in force, meaning."""
    current = settings()
    rows = ["| variable | value | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        value = getattr(current, name)
        shown = "(set)" if name == "api_token" and value else value
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(describe())
