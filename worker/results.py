"""A job's results: written into the local ``results/.partial/<id>.<token>``, with ``job.json`` (the
durable record), then published to the store. In the local data folder that is one rename to
``results/<id>``; in an object store every file is uploaded under ``results/<id>/<attempt>/``, and
the results appear when the job record names that prefix (so a half-uploaded attempt is never
served, and retention removes it with the job)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from core.records import JobRecord
from core.settings import Settings
from core.storage import Storage
from model.options import JOB_FILE, Stats, content_type


def slide_facts(stats: Stats) -> dict[str, Any]:
    s, a = stats["slide"], stats["analysis"]
    return {"width": s["dimensions"][0], "height": s["dimensions"][1], "levels": s["levels"],
            "mpp": s["mpp"], "format": s["format"],
            "analysis": {"width": a["width"], "height": a["height"], "mpp": a["mpp"], "level": a["level"]}}


def write_job_json(out_dir: Path, record: JobRecord, stats: Stats, worker: str,
                   started: float, finished: float) -> None:
    """The durable record of a finished job, next to its results."""
    doc: dict[str, Any] = {
        "id": record.id, "status": record.status,
        "created_at": _iso(record.created_at), "started_at": _iso(started), "finished_at": _iso(finished),
        "options": record.options, "metadata": record.metadata,
        "slide": {k: v for k, v in record.slide.items() if k != "path"} | {"path": record.slide.get("path")},
        "model": record.model,
        "timings_s": {"queued": round(started - record.created_at, 3), "run": round(finished - started, 3),
                      "engine": stats.get("timings_s", {})},
        "versions": stats.get("versions", {}),
        "worker": worker, "attempts": record.attempts, "retries": record.retries,
        "redeliveries": record.redeliveries,
    }
    if record.shards:
        doc["shards"] = [s.model_dump(include={"index", "blocks", "worker", "attempts", "redeliveries"})
                         for s in record.shards]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JOB_FILE).write_text(json.dumps(doc, indent=2))


def publish_results(storage: Storage, partial: Path, job_id: str, attempt: str) -> tuple[str, list[dict[str, Any]]]:
    """Put the complete result folder into the store; returns its key prefix and its file list."""
    files = [{"name": p.name, "size_bytes": p.stat().st_size, "content_type": content_type(p.name)}
             for p in sorted(partial.iterdir()) if p.is_file()]
    prefix = f"results/{job_id}"
    final = storage.local_path(prefix)
    if final is not None:
        _rename_into_place(partial, final)
        return prefix, files
    prefix = f"{prefix}/{attempt}"
    for item in files:
        storage.put_file(f"{prefix}/{item['name']}", partial / str(item["name"]))
    return prefix, files


def _rename_into_place(partial: Path, final: Path) -> None:
    if final.exists():  # an earlier attempt published, then died before recording it
        trash = partial.with_name(partial.name + ".old")
        final.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(final)


def remove_partials(settings: Settings, job_id: str) -> None:
    """Remove half-written result folders that dead attempts at ``job_id`` left behind."""
    folder = settings.results_dir / ".partial"
    if folder.is_dir():
        for stale in folder.glob(f"{job_id}.*"):
            shutil.rmtree(stale, ignore_errors=True)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat()
