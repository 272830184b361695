"""Webhooks of exports: an export that asked for running and succeeded gets both from the real
worker code, in order, delivered signed to a real HTTP receiver; a canceled one records its
canceled state with the cancel; a later request for the same export may not name another
webhook."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from app.errors import Conflict
from app.models import Tenant, WebhookDelivery
from app.schemas import ExportCreate
from app.services.exports import cancel_export, create_export
from tests.api.factories import RecordingSender
from tests.worker.test_exports import _adapter_row, _ask
from tests.worker.test_webhook_events import _Receiver, open_ctx, receiver
from worker.context import Context
from worker.exports import run_export
from worker.webhooks import deliver_for_job

__all__ = ["open_ctx", "receiver"]  # fixtures


def _deliveries(ctx: Context, export_id: str) -> list[WebhookDelivery]:
    with ctx.sessions() as s:
        rows = s.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == export_id)
            .order_by(WebhookDelivery.sequence)
        ).all()
    assert [r.sequence for r in rows] == list(range(len(rows)))
    return list(rows)


def test_an_export_gets_running_then_succeeded(
    open_ctx: Context, tenant: Tenant, receiver: str, tmp_path: Path
) -> None:
    ctx = open_ctx
    adapter_id = _adapter_row(ctx, tenant, tmp_path)
    export_id = _ask(
        ctx,
        tenant,
        adapter_id,
        format="lora",
        rank=4,
        webhook_url=receiver,
        webhook_events=["succeeded", "running"],
    )
    assert run_export(export_id, ctx) == "succeeded"
    rows = _deliveries(ctx, export_id)
    assert [(r.job_kind, r.event) for r in rows] == [
        ("export", "export.running"),
        ("export", "export.succeeded"),
    ]
    assert rows[0].payload["data"]["status"] == "running"
    final = rows[1].payload["data"]
    assert (final["id"], final["status"], final["rank"]) == (export_id, "succeeded", 4)
    assert final["size_bytes"] > 0 and final["links"]["file"].startswith("/v1/adapters/")
    # The worker asked for each delivery when it recorded it.
    notified: list[str] = ctx.notify  # type: ignore[assignment]
    assert notified == [export_id, export_id]

    attempt = deliver_for_job(export_id, settings=ctx.settings, sessions=ctx.sessions)
    assert attempt is not None and attempt.outcome == "delivered (204)"
    assert [p["type"] for p in _Receiver.received] == ["export.running", "export.succeeded"]


def test_the_default_is_the_final_state_and_a_cancel_records_it(
    open_ctx: Context, tenant: Tenant, receiver: str, tmp_path: Path
) -> None:
    ctx = open_ctx
    adapter_id = _adapter_row(ctx, tenant, tmp_path)
    export_id = _ask(ctx, tenant, adapter_id, format="merged", webhook_url=receiver)
    with ctx.sessions() as s:
        cancel_export(session=s, tenant=s.merge(tenant), adapter_id=adapter_id, export_id=export_id)
    rows = _deliveries(ctx, export_id)
    assert [r.event for r in rows] == ["export.canceled"]
    assert rows[0].payload["data"]["status"] == "canceled"
    assert run_export(export_id, ctx) == "skipped (canceled)"
    assert len(_deliveries(ctx, export_id)) == 1


def test_a_shared_export_keeps_the_webhook_of_the_request_that_queued_it(
    open_ctx: Context, tenant: Tenant, receiver: str, tmp_path: Path
) -> None:
    ctx = open_ctx
    adapter_id = _adapter_row(ctx, tenant, tmp_path)
    export_id = _ask(ctx, tenant, adapter_id, format="merged", webhook_url=receiver)

    def again(**data: object) -> str:
        with ctx.sessions() as s:
            row, queued = create_export(
                session=s,
                sender=RecordingSender(),
                settings=ctx.settings,
                tenant=s.merge(tenant),
                adapter_id=adapter_id,
                data=ExportCreate(format="merged", **data),  # type: ignore[arg-type]
            )
            assert not queued
            return row.id

    # No webhook, or the same one: the same export.
    assert again() == export_id
    assert again(webhook_url=receiver, webhook_events=["canceled", "failed", "succeeded"]) == (
        export_id
    )
    with pytest.raises(Conflict) as other_url:
        again(webhook_url=receiver + "/other")
    assert other_url.value.field == "webhook_url"
    with pytest.raises(Conflict) as other_events:
        again(webhook_url=receiver, webhook_events=["running", "succeeded"])
    assert other_events.value.field == "webhook_events"
    # Canceled, the next request queues it again as its own, with its own webhook.
    with ctx.sessions() as s:
        cancel_export(session=s, tenant=s.merge(tenant), adapter_id=adapter_id, export_id=export_id)
    assert _ask(ctx, tenant, adapter_id, format="merged", webhook_url=receiver + "/b") == export_id
    assert run_export(export_id, ctx) == "succeeded"
    rows = _deliveries(ctx, export_id)
    assert [(r.event, r.url) for r in rows] == [
        ("export.canceled", receiver),
        ("export.succeeded", receiver + "/b"),
    ]


def test_an_export_without_a_webhook_records_and_asks_for_nothing(
    ctx: Context, tenant: Tenant, tmp_path: Path
) -> None:
    adapter_id = _adapter_row(ctx, tenant, tmp_path)
    export_id = _ask(ctx, tenant, adapter_id, format="lora", rank=4)
    assert run_export(export_id, ctx) == "succeeded"
    assert _deliveries(ctx, export_id) == []
    assert ctx.notify == []
