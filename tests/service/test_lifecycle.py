"""Exports are jobs like the others, with real processes (a Celery worker, PostgreSQL, a
private redis-server): an export whose message is taken while the worker's database is cut, or
lost with a broker restarted empty, still ends; asking again for a queued one sends its
message (docs/workers.md, "One lifecycle")."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.models import AdapterExport, Tenant
from app.queue import CelerySender
from app.schemas import ExportCreate
from app.services.exports import create_export
from tests.service.procs import RedisServer, TcpProxy, wait_for
from tests.service.test_faults import FAST, Deployment, _ready, deployed

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")


@pytest.fixture
def deploy(logs: Path, tiny_settings: dict[str, object]) -> Iterator[Deployment]:
    # No lease runs out in these tests: a heartbeat late by seconds on a loaded machine must
    # not give an export a second attempt.
    with deployed({**tiny_settings, **FAST, "stale_after_s": 60}, logs) as deployment:
        yield deployment


def _export(deploy: Deployment, tenant: Tenant, adapter_id: str, **data: object) -> str:
    settings = deploy.settings
    with deploy.sessions() as s:
        row, _ = create_export(
            session=s,
            sender=CelerySender(settings.resolved_broker_url),
            settings=settings,
            tenant=s.merge(tenant),
            adapter_id=adapter_id,
            data=ExportCreate(**data),  # type: ignore[arg-type]
        )
        return row.id


def _ended(deploy: Deployment, export_id: str) -> bool:
    return deploy.row(AdapterExport, export_id).status in ("succeeded", "failed", "canceled")


def test_lost_export_messages_are_sent_again(deploy: Deployment, logs: Path, pg_url: str) -> None:
    redis = RedisServer(logs)
    proxy = TcpProxy(int(re.search(r":(\d+)/", pg_url).group(1)))  # type: ignore[union-attr]
    through_proxy = re.sub(r":\d+/", f":{proxy.port}/", pg_url, count=1)
    deploy.values["broker_url"] = redis.url
    try:
        tenant = deploy.tenant("acme")
        job_id = deploy.finetune(tenant, steps=2)
        worker = deploy.worker("w1", database_url=through_proxy)
        assert deploy.wait_final() == {job_id: "succeeded"}
        adapter_id = "ad_" + job_id.removeprefix("ft_")

        # 1. The worker's database is cut while it takes the message: the task retries.
        proxy.off()
        cut = _export(deploy, tenant, adapter_id, format="lora", rank=4)
        wait_for("a retry", lambda: "database not reachable" in worker.log(), 60, [worker])
        proxy.on()
        wait_for("the export", lambda: _ended(deploy, cut), 120, [worker])

        # 2. Two exports whose messages are lost with the broker (no worker meanwhile).
        worker.stop()
        asked = _export(deploy, tenant, adapter_id, format="merged")
        reconciled = _export(deploy, tenant, adapter_id, format="lora", rank=2)
        redis.restart()
        # A worker whose reconciler waits long: only asking again sends `asked`'s message.
        worker = deploy.worker("w2", requeue_after_s=600)
        wait_for("the worker", lambda: _ready(worker), 120, [worker])
        assert _export(deploy, tenant, adapter_id, format="merged") == asked
        wait_for("the export asked again", lambda: _ended(deploy, asked), 120, [worker])
        assert deploy.row(AdapterExport, reconciled).status == "queued"
        # The reconciler sends the other one's.
        worker.stop()
        worker = deploy.worker("w3")
        wait_for("the reconciled export", lambda: _ended(deploy, reconciled), 120, [worker])
        assert "had no message; sent again" in worker.log()
    finally:
        deploy.stop()
        proxy.close()
        redis.stop()
    rows = [deploy.row(AdapterExport, i) for i in (cut, asked, reconciled)]
    assert [(r.status, r.attempts, r.error) for r in rows] == [("succeeded", 1, None)] * 3
    for row in rows:
        assert deploy.storage.path(row.storage_key).stat().st_size == row.size_bytes
    deploy.check()
