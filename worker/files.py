"""Files a job attempt writes, and the collector of files that no row owns.

Every attempt writes under a key of its own (the attempt number is part of the key) and
publishes a file atomically (a rename into place with the local backend, one upload with
S3), then commits the row that points at it. A worker that lost its lease to another one
therefore deletes only its own files, never the winner's; and a crash between the publish and
the commit leaves a file no row owns, which `collect_orphans` removes once it is older than
TUNEQDM_COLLECT_AFTER_S. The collector lists the store, so it works on either backend.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.models import (
    ACTIVE_STATUSES,
    Adapter,
    AdapterExport,
    FinetuneCheckpoint,
    FinetuneJob,
    FinetuneSample,
    GeneratedImage,
    GenerationJob,
)
from worker.jobs import JobModel

log = logging.getLogger(__name__)


def checkpoint_key(tenant_id: str, job_id: str) -> str:
    # One folder per job (not per attempt): the next attempt resumes from it.
    return st.check_key(f"tenants/{tenant_id}/finetunes/{job_id}/checkpoint")


def adapter_attempt_key(tenant_id: str, adapter_id: str, attempt: int) -> str:
    return st.check_key(f"tenants/{tenant_id}/adapters/{adapter_id}_a{attempt}.safetensors")


def checkpoint_attempt_key(tenant_id: str, job_id: str, step: int, attempt: int) -> str:
    # A kept checkpoint (params.keep_checkpoints), not the training state of checkpoint_key.
    prefix = st.finetune_checkpoints_prefix(tenant_id, job_id)
    return st.check_key(f"{prefix}/{step:05d}_a{attempt}.safetensors")


def generated_image_attempt_key(
    tenant_id: str, generation_id: str, attempt: int, index: int
) -> str:
    return st.check_key(
        f"tenants/{tenant_id}/generations/{generation_id}/a{attempt}/{index:03d}.png"
    )


# Folders of files that rows name one by one: the job's model, the rows' key and job columns.
_NAMED_FILES: dict[str, tuple[JobModel, Any, Any]] = {
    "samples": (FinetuneJob, FinetuneSample.storage_key, FinetuneSample.job_id),
    "checkpoints": (FinetuneJob, FinetuneCheckpoint.storage_key, FinetuneCheckpoint.job_id),
    "generations": (GenerationJob, GeneratedImage.storage_key, GeneratedImage.generation_id),
}


def collect_orphans(
    factory: sessionmaker[Session], storage: st.Storage, *, older_than_s: float
) -> list[str]:
    """Remove stored files that no row owns, older than `older_than_s`: adapter files without
    an adapter row; checkpoints of missing or finished fine-tunes; the folder of a fine-tune
    that does not exist (photos of an upload that never committed); progress images and kept
    checkpoints of a missing fine-tune, or of a finished one that no row names; generated
    images that no image row names, unless their generation is still active; and what writes
    that never finished left (temporary files, incomplete multipart uploads). Returns the keys
    (a file) and prefixes (a folder) removed; a folder goes only when nothing in it is
    younger."""
    # Object times are the store's clock (the host's with the local backend); so is this, on
    # a host whose clock is kept in step (a publish in flight is younger than the cutoff).
    cutoff = time.time() - older_than_s
    tenants: dict[str, list[st.StoredObject]] = defaultdict(list)
    for obj in storage.list("tenants"):
        parts = obj.key.split("/")
        if len(parts) >= 4:  # tenants/<tenant>/<kind>/<name>...
            tenants[parts[1]].append(obj)
    removed: list[str] = []
    with factory() as session:
        for tenant_id in sorted(tenants):
            for unit, objects in sorted(_orphans(session, tenant_id, tenants[tenant_id]).items()):
                if all(o.modified < cutoff for o in objects):
                    if unit in {o.key for o in objects}:
                        storage.delete(unit)
                    else:
                        storage.delete_prefix(unit)
                    log.info("collected orphan file(s) %s", unit)
                    removed.append(unit)
    for partial in storage.collect_unfinished(cutoff):
        log.info("collected an unfinished write %s", partial)
        removed.append(partial)
    return removed


def _orphans(
    session: Session, tenant_id: str, objects: list[st.StoredObject]
) -> dict[str, list[st.StoredObject]]:
    """Orphans of one tenant: a key (one file) or a folder-like prefix → the objects in it."""
    found: dict[str, list[st.StoredObject]] = defaultdict(list)
    base = f"tenants/{tenant_id}"
    adapter_keys = set(
        session.scalars(
            select(Adapter.storage_key).where(Adapter.storage_key.startswith(f"{base}/adapters/"))
        )
    )
    jobs: dict[tuple[JobModel, str], FinetuneJob | GenerationJob | None] = {}
    owned: dict[tuple[str, str], set[str]] = {}

    def job_of(model: JobModel, name: str) -> FinetuneJob | GenerationJob | None:
        if (model, name) not in jobs:
            jobs[model, name] = cast("FinetuneJob | GenerationJob | None", session.get(model, name))
        return jobs[model, name]

    for obj in objects:
        kind, name = obj.key.split("/")[2:4]
        if kind == "adapters":
            if obj.key not in adapter_keys:
                found[obj.key].append(obj)
        elif kind == "finetunes":
            job = job_of(FinetuneJob, name)
            folder = f"{base}/finetunes/{name}"
            if job is None:
                found[folder].append(obj)
            elif job.status not in ACTIVE_STATUSES and obj.key.startswith(f"{folder}/checkpoint/"):
                found[f"{folder}/checkpoint"].append(obj)
        elif kind in _NAMED_FILES:
            model, key_column, job_column = _NAMED_FILES[kind]
            job = job_of(model, name)
            if job is None:
                found[f"{base}/{kind}/{name}"].append(obj)
            elif job.status not in ACTIVE_STATUSES:  # its worker writes the file before the row
                if (kind, name) not in owned:
                    owned[kind, name] = set(
                        session.scalars(select(key_column).where(job_column == name))
                    )
                if obj.key not in owned[kind, name]:
                    found[obj.key].append(obj)
    return found


def still_needed(factory: sessionmaker[Session]) -> Callable[[Iterable[str]], set[str]]:
    """For the staging sweep (worker/staging.py): which of these keys (files or folders) a job
    may still need. A fine-tune's photos and checkpoint, an export's file: only while the job
    is queued or running (a deleted or ended job's copies go at once, whatever their age). Any
    other key (an adapter being published or cached, a folder above a job's) is left to the
    age rule."""

    def needed(keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        owners: dict[tuple[JobModel, str], list[str]] = defaultdict(list)
        kept = set()
        for key in keys:
            parts = key.split("/")
            if len(parts) >= 4 and parts[0] == "tenants" and parts[2] == "finetunes":
                owners[FinetuneJob, parts[3]].append(key)
            elif len(parts) >= 4 and parts[0] == "tenants" and parts[2] == "exports":
                owners[AdapterExport, parts[3].removesuffix(".safetensors")].append(key)
            else:
                kept.add(key)
        with factory() as session:
            for model in (FinetuneJob, AdapterExport):
                ids = [job_id for m, job_id in owners if m is model]
                if not ids:
                    continue
                active = set(
                    session.scalars(
                        select(model.id).where(model.id.in_(ids), model.status.in_(ACTIVE_STATUSES))
                    )
                )
                for job_id in active:
                    kept.update(owners[model, job_id])
        return kept

    return needed
