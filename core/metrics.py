"""What workers publish for the API to show: the model cards they loaded (``/v1/models``) and job
counters and duration histograms (``/metrics``), as Redis hashes under ``core.keys``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import redis

from core.keys import Keys
from core.records import decode

DURATION_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0)


class ServiceMetrics:
    """Model cards and job metrics in Redis; every method is one round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def publish_model(self, sha256: str, info: Mapping[str, Any]) -> None:
        self.r.hset(Keys.MODELS, sha256, json.dumps(dict(info)))

    def models(self) -> list[dict[str, Any]]:
        """The loaded model cards, the most recently loaded first."""
        raw = decode(self.r.hgetall(Keys.MODELS))
        cards = [json.loads(v) for v in raw.values()]
        return sorted(cards, key=lambda m: m.get("loaded_at", 0), reverse=True)

    def observe(self, status: str, duration_s: float, tiles: int) -> None:
        """Add one finished job to the duration histogram and the tile counter."""
        bucket = next((f"{b:g}" for b in DURATION_BUCKETS if duration_s <= b), "+Inf")
        pipe = self.r.pipeline(transaction=False)
        pipe.hincrby(Keys.METRICS, f"duration:{status}:{bucket}", 1)
        pipe.hincrbyfloat(Keys.METRICS, f"duration_sum:{status}", duration_s)
        pipe.hincrby(Keys.METRICS, "tiles", tiles)
        pipe.execute()

    def counters(self) -> dict[str, float]:
        return {k: float(v) for k, v in decode(self.r.hgetall(Keys.METRICS)).items()}
