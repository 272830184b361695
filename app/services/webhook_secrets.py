"""Tenants' webhook signing secrets: show the current one, rotate to a new one.

Secrets are derived (app.webhooks.tenant_webhook_secret), so rotating only bumps the tenant's
secret version; for TUNEQDM_WEBHOOK_SECRET_OVERLAP_S afterwards webhooks carry a signature with
the old secret and one with the new, so receivers can switch without missing a webhook.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.models import Tenant, utcnow
from app.settings import Settings
from app.webhooks import tenant_webhook_secret

audit = logging.getLogger("tuneqdm.audit")


def current_secret(settings: Settings, tenant: Tenant) -> str:
    return tenant_webhook_secret(
        settings.resolved_secret_key, tenant.id, tenant.webhook_secret_version or 0
    )


def rotate_secret(*, session: Session, settings: Settings, name: str) -> tuple[Tenant, str]:
    """Bump the tenant's secret version (in the caller's transaction); returns the new secret."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"no tenant named {name!r}; `tuneqdm-admin keys list` shows the tenants")
    now = utcnow()
    # One UPDATE that increments in the database, so two rotations at once give two versions.
    session.execute(
        update(Tenant)
        .where(Tenant.id == tenant.id)
        .values(
            webhook_secret_version=Tenant.webhook_secret_version + 1,
            webhook_secret_rotated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    session.refresh(tenant)
    overlap = settings.webhook_secret_overlap_s
    audit.info(
        "webhook secret rotated",
        extra={
            "audit": "webhook_secret.rotate",
            "tenant_id": tenant.id,
            "version": tenant.webhook_secret_version,
            "old_valid_until": (now + timedelta(seconds=overlap)).isoformat(),
        },
    )
    return tenant, current_secret(settings, tenant)
