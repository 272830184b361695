"""Adapters: read, download and delete (the worker creates them)."""

from __future__ import annotations

import logging

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.ids import looks_like_id
from app.logs import audit
from app.models import Adapter, AdapterExport, Tenant
from app.services.common import page
from app.storage import Storage

log = logging.getLogger(__name__)


def _query(tenant: Tenant) -> Select[Adapter]:
    return select(Adapter).where(Adapter.tenant_id == tenant.id)


def get_adapter(*, session: Session, tenant: Tenant, adapter_id: str) -> Adapter:
    adapter = None
    if looks_like_id(adapter_id, "ad"):
        adapter = session.scalar(_query(tenant).where(Adapter.id == adapter_id))
    if adapter is None:
        raise NotFound(f"no adapter with id {adapter_id!r}")
    return adapter


def list_adapters(
    *, session: Session, tenant: Tenant, limit: int, offset: int
) -> tuple[list[Adapter], int]:
    stmt = _query(tenant).order_by(Adapter.created_at.desc(), Adapter.id)
    return page(session, stmt, limit=limit, offset=offset)


def delete_adapter(*, session: Session, storage: Storage, tenant: Tenant, adapter_id: str) -> None:
    adapter = get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    exports = session.scalars(select(AdapterExport).where(AdapterExport.adapter_id == adapter.id))
    keys = [adapter.storage_key] + [e.storage_key for e in exports if e.storage_key]
    session.execute(delete(AdapterExport).where(AdapterExport.adapter_id == adapter.id))
    session.delete(adapter)
    session.commit()
    # Rows first: a leftover file is harmless garbage, a row without its file is a broken adapter.
    for key in keys:
        try:
            storage.delete(key)
        except OSError:
            log.exception(
                "adapter %s deleted but its file %s could not be removed", adapter_id, key
            )
    audit("adapter.delete", tenant_id=tenant.id, adapter_id=adapter_id)
