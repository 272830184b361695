"""Adapters: read, download, delete, upload, and promote a fine-tune's kept checkpoint (the
worker creates the trained ones)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from app import storage as st
from app.adapter_files import AdapterHeader, read_header
from app.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from app.ids import looks_like_id, new_id
from app.logs import audit
from app.models import (
    ACTIVE_STATUSES,
    Adapter,
    AdapterExport,
    FinetuneCheckpoint,
    ServedBase,
    Tenant,
)
from app.services.common import page
from app.services.finetunes import get_finetune
from app.services.quotas import check_new_bytes
from app.settings import Settings
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


def _short(fingerprint: str | None) -> str:
    return f"{fingerprint[:19]}…" if fingerprint else "not yet known (no worker loaded it)"


def match_base(*, session: Session, header: AdapterHeader, base: str | None) -> ServedBase:
    """The registered base the adapter was made for: `base` when named, else the one with
    the file's fingerprint. InvalidInput names every fact that differs."""
    if base is not None:
        row = session.get(ServedBase, base)
        if row is None:
            known = ", ".join(repr(n) for n in session.scalars(select(ServedBase.name))) or "none"
            raise InvalidInput(
                f"base {base!r} is not registered; registered bases: {known}", field="base"
            )
        candidates = [row]
    else:
        candidates = list(session.scalars(select(ServedBase).order_by(ServedBase.name)))
        exact = [r for r in candidates if r.fingerprint == header.base_fingerprint]
        candidates = exact or candidates
    if not candidates:
        raise InvalidInput("no base is registered yet; start a worker first", field="file")
    for row in candidates:
        if row.fingerprint == header.base_fingerprint and row.bits == header.bits:
            return row
    differences = []
    for row in candidates:
        facts = []
        if row.fingerprint != header.base_fingerprint:
            facts.append(
                f"base fingerprint {_short(header.base_fingerprint)} in the file, "
                f"{_short(row.fingerprint)} registered"
            )
        if row.bits != header.bits:
            facts.append(f"bits {header.bits} in the file, {row.bits} registered")
        differences.append(f"base {row.name!r}: " + "; ".join(facts))
    raise InvalidInput(
        "the adapter was made for another base (" + " | ".join(differences) + "); fine-tune "
        "it on a base this service serves (GET /v1/bases)",
        field="file",
    )


def _size_of(f: BinaryIO) -> int:
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    return size


def upload_adapter(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: Tenant,
    file: BinaryIO,
    name: str | None,
    base: str | None,
) -> Adapter:
    """Check an adapter file made by `tuneqdm finetune` against the registered bases and
    store it as a registry adapter. Nothing is stored when a check fails."""
    size = _size_of(file)
    if size > settings.max_adapter_bytes:
        raise PayloadTooLarge(
            f"file: {size} bytes, above the adapter limit of {settings.max_adapter_bytes} "
            "bytes (TUNEQDM_MAX_ADAPTER_BYTES)",
            field="file",
        )
    header = read_header(file, size)
    row = match_base(session=session, header=header, base=base)
    with tempfile.TemporaryDirectory(prefix="tuneqdm-adapter-") as folder:
        path = Path(folder) / "adapter.safetensors"
        file.seek(0)
        with path.open("wb") as out:
            shutil.copyfileobj(file, out)
        adapter = _register(
            session=session,
            storage=storage,
            settings=settings,
            tenant=tenant,
            path=path,
            header=header,
            name=name,
            base_model=row.name,
        )
    audit("adapter.upload", tenant_id=tenant.id, adapter_id=adapter.id)
    return adapter


def promote_checkpoint(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: Tenant,
    finetune_id: str,
    step: int,
) -> Adapter:
    """A registry adapter from the checkpoint a finished fine-tune kept at `step`: a copy of
    its file, so deleting the fine-tune (and its checkpoints) or the adapter leaves the other
    whole. Conflict while the job is queued or running, NotFound for a step it did not keep."""
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    if job.status in ACTIVE_STATUSES:
        raise Conflict(
            f"fine-tune {job.id} is {job.status}; promote its checkpoints once it has finished "
            f"(GET /v1/finetunes/{job.id} shows its status)"
        )
    checkpoint = session.scalar(
        select(FinetuneCheckpoint).where(
            FinetuneCheckpoint.job_id == job.id, FinetuneCheckpoint.step == step
        )
    )
    missing = NotFound(
        f"fine-tune {job.id} kept no checkpoint at step {step}; "
        f"GET /v1/finetunes/{job.id}/checkpoints lists those it has"
    )
    if checkpoint is None:
        raise missing
    with tempfile.TemporaryDirectory(prefix="tuneqdm-adapter-") as folder:
        path = Path(folder) / "adapter.safetensors"
        try:
            storage.get_file(checkpoint.storage_key, path)
        except FileNotFoundError:
            raise missing from None  # the fine-tune is being deleted
        with path.open("rb") as f:
            header = read_header(f, path.stat().st_size)
        adapter = _register(
            session=session,
            storage=storage,
            settings=settings,
            tenant=tenant,
            path=path,
            header=header,
            name=_promoted_name(job.name or job.id, step),
            base_model=job.base_model,
        )
    audit(
        "adapter.promote",
        tenant_id=tenant.id,
        adapter_id=adapter.id,
        finetune_id=job.id,
        step=step,
    )
    return adapter


def _promoted_name(name: str, step: int) -> str:
    # The job's name and the step, within the 100 characters of adapters.name.
    suffix = f" step {step}"
    return name[: 100 - len(suffix)] + suffix


def _register(
    *,
    session: Session,
    storage: Storage,
    settings: Settings,
    tenant: Tenant,
    path: Path,
    header: AdapterHeader,
    name: str | None,
    base_model: str,
) -> Adapter:
    """Store the checked adapter file at `path` under a new id and commit its row, once the
    stored bytes limit allows it; nothing stays stored when that fails."""
    size = path.stat().st_size
    adapter_id = new_id("ad")
    key = st.adapter_key(tenant.id, adapter_id)
    check_new_bytes(session=session, tenant=tenant, settings=settings, adding_bytes=size)
    storage.put_file(key, path)
    try:
        adapter = Adapter(
            id=adapter_id,
            tenant_id=tenant.id,
            finetune_job_id=None,
            name=name,
            method=header.method,
            bits=header.bits,
            intervals=header.intervals,
            tokens=header.tokens,
            size_bytes=size,
            base_model=base_model,
            base_fingerprint=header.base_fingerprint,
            storage_key=key,
        )
        session.add(adapter)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    return adapter
