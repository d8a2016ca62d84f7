"""``/metrics``: Prometheus text exposition, read from Redis at scrape time.

Workers add to the counters (``JobStore.observe``); any API replica can serve them, so the numbers
are the service's, not one process's.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from api.deps import RedisDep, StoreDep, get_tenant
from api.schemas import error_responses
from core.celery_app import QUEUES
from core.metrics import DURATION_BUCKETS
from core.records import STATUSES

router = APIRouter(tags=["metrics"], dependencies=[Depends(get_tenant)])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/metrics", response_class=PlainTextResponse, responses=error_responses(401, 503))
def metrics(store: StoreDep, client: RedisDep) -> PlainTextResponse:
    """Jobs by state, job duration histogram, tiles processed, broker queue lengths."""
    counters = store.metrics.counters()
    lines = [
        *_family("nucseg_jobs", "gauge", "jobs in the store by state",
                 [({"status": s}, n) for s, n in store.count_by_status().items()]),
        *_histogram(counters),
        *_family("nucseg_tiles_processed_total", "counter", "network tiles run by workers",
                 [({}, counters.get("tiles", 0.0))]),
        *_family("nucseg_queue_length", "gauge", "messages waiting in the broker queue",
                 [({"queue": q}, client.llen(q)) for q in QUEUES]),
    ]
    return PlainTextResponse("\n".join(lines) + "\n", media_type=CONTENT_TYPE)


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
            *(f"{name}{_labels(labels)} {_num(value)}" for labels, value in samples)]


def _histogram(counters: dict[str, float]) -> list[str]:
    name = "nucseg_job_duration_seconds"
    lines = [f"# HELP {name} run time of finished jobs (claim to end)", f"# TYPE {name} histogram"]
    for status in sorted(s for s in STATUSES if s not in ("queued", "running")):
        total = 0.0
        for bound in [*(f"{b:g}" for b in DURATION_BUCKETS), "+Inf"]:
            total += counters.get(f"duration:{status}:{bound}", 0.0)
            lines.append(f"{name}_bucket{_labels({'status': status, 'le': bound})} {_num(total)}")
        seconds = counters.get(f"duration_sum:{status}", 0.0)
        lines.append(f"{name}_sum{_labels({'status': status})} {_num(seconds)}")
        lines.append(f"{name}_count{_labels({'status': status})} {_num(total)}")
    return lines


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}"


def _num(value: float) -> str:
    return f"{int(value)}" if float(value).is_integer() else repr(float(value))
