"""The worker's recovery sweep, run at start and then every ``sweep_interval_s``.

A worker that dies mid-job leaves its message unacked in Redis and its lease expiring. Each running
job without a lease is put back to ``queued`` and its original message is restored to the front of
its queue (or a fresh one is sent if that message is gone), at most ``max_redeliveries`` times, then
it fails with ``worker_lost``. A shard whose worker is gone is requeued the same way, on its own:
its job's other shards go on, and finished ones are not redone. Lost retry and merge messages are
resent, and the retention policy runs every ``retention_interval_s``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from core.celery_app import send_job, send_shard
from core.retention import discard_ended
from core.retention import sweep as sweep_retention
from core.settings import Settings, get_settings
from core.shards import ShardStore
from core.store import JobStore, Orphan
from worker.resources import process_store
from worker.results import remove_partials

log = logging.getLogger(__name__)
UNSENT_GRACES = 4


def recover_orphans(app: Celery, store: JobStore, settings: Settings) -> list[Orphan]:
    """Requeue (or fail) running jobs whose process is gone; resend lost retry messages."""
    handled: list[Orphan] = []
    for job_id in store.orphans():
        orphan = store.recover(job_id, max_redeliveries=settings.max_redeliveries)
        if orphan is None:
            continue
        if orphan.action == "requeued":
            how = redeliver(app, orphan)
            log.warning("job %s: its worker is gone; requeued (%s)", job_id, how)
        else:
            remove_partials(settings, job_id)
            if (record := store.get(job_id)) is not None:
                discard_ended(settings, record)
            log.warning("job %s: its worker is gone; %s", job_id, orphan.action)
        handled.append(orphan)
    recover_shards(app, store, settings)
    grace = 2 * settings.lease_ttl_s + settings.sweep_interval_s
    for job_id in store.overdue_retries(grace):
        record = store.get(job_id)
        if record is not None and record.status == "queued":
            log.warning("job %s: its retry is overdue; sending it again", job_id)
            send_job(app, job_id, record.queue)
        store.touch_retry(job_id, grace)
    return handled


def recover_shards(app: Celery, store: JobStore, settings: Settings) -> None:
    """Requeue the shards whose worker is gone; resend a merge whose message was lost."""
    shards = ShardStore(store)
    grace = 2 * settings.lease_ttl_s + settings.sweep_interval_s
    for job_id in shards.sharded_jobs():
        queue = (record.queue if (record := store.get(job_id)) is not None else settings.queue)
        for index in shards.orphans(job_id):
            action = shards.recover(job_id, index, max_redeliveries=settings.max_redeliveries)
            if action == "requeued":
                send_shard(app, job_id, index, queue)
            if action != "skip":
                log.warning("job %s: the worker of shard %d is gone; %s", job_id, index, action)
            if action in ("failed", "cancelled") and record is not None:
                discard_ended(settings, record)
        # a shard may wait long in a busy queue: resent after four graces (9 min at the defaults), and a
        # duplicate is dropped by the claim
        for index in shards.unsent(job_id, UNSENT_GRACES * grace):
            log.warning("job %s: shard %d was queued long ago and never ran; sending it again", job_id, index)
            send_shard(app, job_id, index, queue)
        if shards.merge_overdue(job_id, grace):
            log.warning("job %s: its shards are done but no merge started; sending it again", job_id)
            send_job(app, job_id, queue)


def redeliver(app: Celery, orphan: Orphan) -> str:
    """Put the orphan's own unacked message back at the front of its queue, else send a new one."""
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        tag = orphan.delivery_tag
        if tag and channel.client.hexists(channel.unacked_key, tag):
            channel.qos.restore_by_tag(tag, leftmost=False)  # RPUSH: the next message BRPOP takes
            return "restored"
    send_job(app, orphan.job_id, orphan.queue)
    return "resent"


def sweep_forever(app: Celery) -> None:
    """Recover orphans every ``sweep_interval_s`` and apply retention; runs in a worker's main process."""
    settings = get_settings()
    next_retention = 0.0
    while True:
        try:
            recover_orphans(app, process_store(settings), settings)
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + settings.retention_interval_s
                sweep_retention(process_store(settings), settings)
        except Exception:  # keep sweeping through Redis outages
            log.exception("recovery sweep failed")
        time.sleep(settings.sweep_interval_s)
