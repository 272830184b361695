"""Tenants and API keys (used by the CLI and by request authentication)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound, Unauthorized
from app.ids import new_id
from app.logs import audit
from app.models import ApiKey, Tenant, utcnow
from app.security import generate_api_key, hash_api_key


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(id=new_id("tn"), name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(*, session: Session, tenant: Tenant) -> tuple[ApiKey, str]:
    """Returns the row and the plaintext key, which is not stored anywhere."""
    key = generate_api_key()
    row = ApiKey(
        id=new_id("key"), tenant_id=tenant.id, key_hash=hash_api_key(key), key_hint=key[:8]
    )
    session.add(row)
    session.flush()
    audit("key.create", tenant_id=tenant.id, key_id=row.id)
    return row, key


def revoke_key(*, session: Session, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key with id {key_id!r}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit("key.revoke", tenant_id=row.tenant_id, key_id=row.id)
    return row


def list_keys(*, session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def authenticate(*, session: Session, key: str) -> Tenant:
    row = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None))
    )
    if row is None:
        # No command to run here: the caller may have no shell on the server, and there the
        # admin command lives in the project's .venv/bin (README, "Commands").
        raise Unauthorized(
            "unknown or revoked API key; use the key `make run` printed, or ask the operator "
            "for one (docs/api.md, Authentication)"
        )
    return row.tenant
