"""Local copies of stored files for the model code, which reads and writes paths.

With the local backend the worker sees the API's directory, so stored files are used in place
(exactly as before there was a second backend). With any other backend the worker shares no
filesystem with anyone: a file it reads is downloaded into TUNEQDM_STAGING_DIR and checked
against the stored size and digest; a file it publishes is written there and uploaded (one
atomic put); a fine-tune's checkpoint lives there and is uploaded after every save, so a
worker on another machine resumes from it. Copies are removed when their job is done with
them: people's photos do not linger on worker disks.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from app import storage as st
from worker.files import checkpoint_key

log = logging.getLogger(__name__)

# The one file tuneqdm_core.finetune keeps in its checkpoint folder (CHECKPOINT_NAME there;
# not imported, which would load torch here).
CHECKPOINT_FILE = "checkpoint.pt"


class Staging:
    def __init__(self, storage: st.Storage, staging_dir: Path) -> None:
        self.storage = storage
        self._local = storage if isinstance(storage, st.LocalStorage) else None
        # The folder every local path lies under (user messages strip it).
        self.root = self._local.root if self._local is not None else staging_dir.resolve()
        self._uploaded: dict[str, int] = {}  # checkpoint key → mtime_ns of the last upload

    def path(self, key: str) -> Path:
        """Where `key`'s local copy is (or is to be) kept."""
        if self._local is not None:
            return self._local.path(key)
        return self.root / st.check_key(key)

    def fetch(self, key: str) -> Path:
        """A local file with the stored object's content. Keys other than a checkpoint's are
        written once, so a copy already here (verified when it was fetched) is that object."""
        path = self.path(key)
        if self._local is None and not path.is_file():
            self.storage.get_file(key, path)
        return path

    def output(self, key: str) -> Path:
        """Where to write a file that `publish(key)` then stores."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, key: str) -> None:
        """Store the file written at `output(key)` (in place already with the local backend)."""
        if self._local is None:
            path = self.path(key)
            try:
                self.storage.put_file(key, path)
            finally:
                path.unlink(missing_ok=True)

    def discard(self, key: str) -> None:
        """Remove the local copies of `key` (a file or a folder-like prefix); the stored
        objects stay."""
        if self._local is None:
            path = self.path(key)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def adapter(self, runtime: Any, adapter_id: str, key: str) -> Any:
        """The adapter from the runtime's memory, or loaded from a copy fetched for it (the
        runtime's LRU is the cache; the copy goes once it is loaded)."""
        fetch: Callable[[], Path] = lambda: self.fetch(key)  # noqa: E731
        try:
            return runtime.adapter(adapter_id, fetch)
        finally:
            self.discard(key)

    def sweep(
        self, older_than_s: float, needed: Callable[[Iterable[str]], set[str]] | None = None
    ) -> list[Path]:
        """Remove local copies that no job needs (those of a worker process that died before
        it removed them): at once when `needed` (given the keys of all copies) leaves them out,
        a deleted or ended job's; any other once it is older than `older_than_s`. A running
        job never needs an old copy: its photos are read once at its start, its checkpoint at
        its start or rewritten, its outputs uploaded as soon as they are written."""
        if self._local is not None or not self.root.is_dir():
            return []
        cutoff = time.time() - older_than_s
        files = {
            p.relative_to(self.root).as_posix(): p for p in self.root.rglob("*") if p.is_file()
        }
        keep = needed(files) if needed is not None else set(files)
        removed = []
        for key, path in files.items():
            with contextlib.suppress(FileNotFoundError):
                if key not in keep or path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed.append(path)
        folders = {
            p.relative_to(self.root).as_posix(): p for p in self.root.rglob("*") if p.is_dir()
        }
        # Empty folders go too, but not those of a job that still runs (its checkpoint folder
        # is empty until its first save).
        busy = needed(folders) if needed is not None else set()
        for key in sorted(folders, reverse=True):  # deepest first
            if key not in busy:
                with contextlib.suppress(OSError):
                    folders[key].rmdir()  # only empty ones go
        return removed

    # --- a fine-tune's checkpoint folder ---

    def checkpoint_dir(self, tenant_id: str, job_id: str) -> Path:
        """The folder training saves its checkpoint in, holding the stored checkpoint (if any)
        to resume from."""
        key = checkpoint_key(tenant_id, job_id)
        folder = self.path(key)
        if self._local is None:
            # Another worker may have saved a later one since this machine last ran the job.
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                self.storage.get_file(f"{key}/{CHECKPOINT_FILE}", folder / CHECKPOINT_FILE)
            self._uploaded[key] = self._mtime(folder / CHECKPOINT_FILE)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _mtime(path: Path) -> int:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def save_checkpoint(
        self, tenant_id: str, job_id: str, owned: Callable[[], AbstractContextManager[Any]]
    ) -> bool:
        """Upload the checkpoint when training saved a new one since the last upload (called
        after every step: training saves after its progress report, so a save is uploaded at
        the next step's report, or when the run stops). The upload happens inside `owned()`
        (worker/context.py `while_owned`: the job's row locked while its lease is this
        worker's), never for a job canceled, deleted or taken over: a DELETE that removed the
        job's files cannot be followed by this worker's upload. False when the lease is lost."""
        if self._local is not None:
            return True
        key = checkpoint_key(tenant_id, job_id)
        path = self.path(key) / CHECKPOINT_FILE
        mtime = self._mtime(path)
        if mtime and mtime != self._uploaded.get(key):
            with owned() as held:
                if held is None:
                    return False
                self.storage.put_file(f"{key}/{CHECKPOINT_FILE}", path)
            self._uploaded[key] = mtime
        return True

    def drop_checkpoint(self, tenant_id: str, job_id: str) -> None:
        """The job is over: its checkpoint goes, stored and local."""
        key = checkpoint_key(tenant_id, job_id)
        try:
            self.storage.delete_prefix(key)
        except OSError:
            # The orphan collector removes a finished job's checkpoint later.
            log.warning("could not delete the checkpoint of %s", job_id, exc_info=True)
        self.discard(key)
