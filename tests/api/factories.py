"""Row factories and small helpers for the API tests."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import storage as st
from app.errors import ServiceUnavailable
from app.ids import new_id
from app.models import (
    Adapter,
    FinetuneJob,
    GeneratedImage,
    GenerationJob,
    Tenant,
    utcnow,
)
from app.schemas import FinetuneParams
from app.services import keys


class RecordingSender:
    """Stands in for the Celery sender in tests that are not about the queue."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.fail = False

    def send(self, task: str, object_id: str, *, queue: str) -> None:
        if self.fail:
            raise ServiceUnavailable("queue down (test); nothing was stored, retry later")
        self.sent.append((task, object_id, queue))

    def ping(self) -> None:
        if self.fail:
            raise ServiceUnavailable("broker not reachable (test)")

    def queue_sizes(self, queues: Iterable[str]) -> dict[str, int]:
        """Messages sent and not consumed: here, everything sent."""
        self.ping()
        return {q: sum(1 for *_, queue in self.sent if queue == q) for q in queues}


@dataclass
class TenantKey:
    tenant: Tenant
    key: str
    key_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def make_tenant(session: Session, name: str | None = None) -> TenantKey:
    tenant = keys.get_or_create_tenant(session=session, name=name or new_id("tenant"))
    row, key = keys.create_key(session=session, tenant=tenant)
    session.commit()
    return TenantKey(tenant=tenant, key=key, key_id=row.id)


def image_bytes(w: int = 64, h: int = 64, fmt: str = "PNG", color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format=fmt)
    return buf.getvalue()


def make_finetune(
    session: Session,
    tenant: Tenant,
    *,
    status: str = "succeeded",
    base_model: str = "tuneqdm/fashion-sd",
    **values: Any,
) -> FinetuneJob:
    params = FinetuneParams().model_dump(mode="json")
    job = FinetuneJob(
        id=new_id("ft"),
        tenant_id=tenant.id,
        status=status,
        instance_prompt="a photo of sks dog",
        token="sks",
        base_model=base_model,
        params=params,
        progress_step=0,
        progress_total=params["steps"],
        **values,
    )
    session.add(job)
    session.commit()
    return job


def make_adapter(
    session: Session,
    storage: st.Storage,
    tenant: Tenant,
    *,
    job_status: str = "succeeded",
    base_model: str = "tuneqdm/fashion-sd",
    content: bytes = b"fake safetensors bytes",
) -> Adapter:
    """An adapter row and its file, the way the worker will create them."""
    job = make_finetune(session, tenant, status=job_status, base_model=base_model)
    adapter_id = new_id("ad")
    key = st.adapter_key(tenant.id, adapter_id)
    storage.put(key, content)
    adapter = Adapter(
        id=adapter_id,
        tenant_id=tenant.id,
        finetune_job_id=job.id,
        name="my dog",
        method="tuneqdm",
        bits=8,
        intervals=2,
        tokens=["sks"],
        size_bytes=len(content),
        base_model=base_model,
        base_fingerprint="sha256:" + "0" * 16,
        storage_key=key,
    )
    session.add(adapter)
    session.commit()
    return adapter


def make_generation(
    session: Session,
    storage: st.Storage,
    tenant: Tenant,
    *,
    images: int = 0,
    adapter_id: str | None = None,
    status: str | None = None,
) -> GenerationJob:
    gen = GenerationJob(
        id=new_id("gen"),
        tenant_id=tenant.id,
        adapter_id=adapter_id,
        base_model="tuneqdm/fashion-sd",
        status=status or ("succeeded" if images else "queued"),
        prompt="a photo of sks dog",
        num_images=max(images, 1),
        steps=10,
        guidance_scale=7.5,
        seed=42,
        width=64,
        height=64,
        scheduler="ddim",
        finished_at=utcnow() if images else None,
    )
    for i in range(images):
        key = st.generated_image_key(tenant.id, gen.id, i)
        storage.put(key, image_bytes(color="blue"))
        gen.images.append(GeneratedImage(index=i, seed=42 + i, storage_key=key))
    session.add(gen)
    session.commit()
    return gen


@dataclass
class Snapshot:
    rows: dict[str, int]
    files: set[str] = field(default_factory=set)


def snapshot(session: Session, storage: st.LocalStorage) -> Snapshot:
    """Row counts of the job tables and the set of stored files, to prove nothing was written."""
    from app.models import Base

    session.expire_all()
    rows = {
        t.name: int(session.scalar(select(func.count()).select_from(t)) or 0)
        for t in Base.metadata.sorted_tables
    }
    root = storage.root
    files = (
        {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
        if root.exists()
        else set()
    )
    return Snapshot(rows=rows, files=files)
