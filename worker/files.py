"""Files a job attempt writes, and the collector of files that no row owns.

Every attempt writes under a path of its own (the attempt number is part of the key) and
publishes a file by renaming it into place, then commits the row that points at it. A worker
that lost its lease to another one therefore deletes only its own files, never the winner's;
and a crash between the rename and the commit leaves a file no row owns, which
`collect_orphans` removes once it is older than TUNEQDM_COLLECT_AFTER_S.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.models import (
    ACTIVE_STATUSES,
    Adapter,
    FinetuneJob,
    FinetuneSample,
    GeneratedImage,
    GenerationJob,
)

log = logging.getLogger(__name__)


def checkpoint_key(tenant_id: str, job_id: str) -> str:
    # One folder per job (not per attempt): the next attempt resumes from it.
    return st.check_key(f"tenants/{tenant_id}/finetunes/{job_id}/checkpoint")


def adapter_attempt_key(tenant_id: str, adapter_id: str, attempt: int) -> str:
    return st.check_key(f"tenants/{tenant_id}/adapters/{adapter_id}_a{attempt}.safetensors")


def generated_image_attempt_key(
    tenant_id: str, generation_id: str, attempt: int, index: int
) -> str:
    return st.check_key(
        f"tenants/{tenant_id}/generations/{generation_id}/a{attempt}/{index:03d}.png"
    )


def _old(path: Path, cutoff: float) -> bool:
    """True when nothing under `path` was modified after `cutoff` (a publish in flight is
    younger)."""
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    try:
        return all(p.stat().st_mtime < cutoff for p in paths)
    except FileNotFoundError:
        return False


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # an attempt's folder of images, now empty
    log.info("collected orphan file(s) %s", path)


def collect_orphans(
    factory: sessionmaker[Session], root: Path, *, older_than_s: float
) -> list[Path]:
    """Remove files under the storage `root` that no row owns, older than `older_than_s`:
    adapter files without an adapter row; checkpoints of missing or finished fine-tunes; the
    folder of a fine-tune that does not exist (photos of an upload that never committed);
    progress images of a missing fine-tune, or of a finished one that no sample row names;
    generated images that no image row names, unless their generation is still active."""
    cutoff = time.time() - older_than_s  # file times are the host's clock, so is this
    removed: list[Path] = []
    tenants = root / "tenants"
    if not tenants.is_dir():
        return removed
    with factory() as session:
        for tenant_dir in sorted(p for p in tenants.iterdir() if p.is_dir()):
            candidates = _orphans(session, root, tenant_dir)
            for path in candidates:
                if _old(path, cutoff):
                    _remove(path)
                    removed.append(path)
    return removed


def _orphans(session: Session, root: Path, tenant_dir: Path) -> list[Path]:
    def key(path: Path) -> str:
        return path.relative_to(root).as_posix()

    found: list[Path] = []
    adapters = tenant_dir / "adapters"
    if adapters.is_dir():
        owned = set(
            session.scalars(
                select(Adapter.storage_key).where(Adapter.storage_key.startswith(key(adapters)))
            )
        )
        found += [p for p in adapters.iterdir() if key(p) not in owned]
    finetunes = tenant_dir / "finetunes"
    for folder in sorted(finetunes.iterdir()) if finetunes.is_dir() else []:
        job = session.get(FinetuneJob, folder.name)
        if job is None:
            found.append(folder)
        elif job.status not in ACTIVE_STATUSES and (folder / "checkpoint").exists():
            found.append(folder / "checkpoint")
    samples = tenant_dir / "samples"
    for folder in sorted(samples.iterdir()) if samples.is_dir() else []:
        job = session.get(FinetuneJob, folder.name)
        if job is None:
            found.append(folder)
            continue
        if job.status in ACTIVE_STATUSES:
            continue  # its worker writes the file before the row
        owned = set(
            session.scalars(
                select(FinetuneSample.storage_key).where(FinetuneSample.job_id == job.id)
            )
        )
        found += [p for p in folder.rglob("*") if p.is_file() and key(p) not in owned]
    generations = tenant_dir / "generations"
    for folder in sorted(generations.iterdir()) if generations.is_dir() else []:
        gen = session.get(GenerationJob, folder.name)
        if gen is None:
            found.append(folder)
            continue
        if gen.status in ACTIVE_STATUSES:
            continue
        owned = set(
            session.scalars(
                select(GeneratedImage.storage_key).where(GeneratedImage.generation_id == gen.id)
            )
        )
        found += [p for p in folder.rglob("*") if p.is_file() and key(p) not in owned]
    return found
