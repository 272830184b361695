"""File storage for uploads, checkpoints, adapters, exports and generated images.

Layout under the storage root or in the bucket (keys are built here from server-side ids only,
never from user file names, and every key is checked to stay inside the root):

    tenants/<tenant_id>/finetunes/<finetune_id>/inputs/<nnn>.jpg     uploaded photos, re-encoded
    tenants/<tenant_id>/finetunes/<finetune_id>/checkpoint/          training checkpoints (worker)
    tenants/<tenant_id>/samples/<finetune_id>/<step>_<i>.png         progress images (worker)
    tenants/<tenant_id>/checkpoints/<finetune_id>/<step>_a<n>.safetensors  kept checkpoints
    tenants/<tenant_id>/adapters/<adapter_id>_a<n>.safetensors       adapter files (worker)
    tenants/<tenant_id>/exports/<export_id>.safetensors              LoRA / merged UNet (worker)
    tenants/<tenant_id>/generations/<generation_id>/a<n>/<nnn>.png   generated images (worker)

Two backends implement the `Storage` protocol, chosen by TUNEQDM_STORAGE_BACKEND through
`storage_from_settings` (the API and the worker both call it): `LocalStorage`, a directory
(the embedded default; every process that uses it must see the same directory), and
`S3Storage` (app/s3_storage.py), an S3-compatible bucket (AWS S3, MinIO, SeaweedFS), which
API replicas and workers on different machines share without a shared filesystem. A worker
copies what it reads into a local staging folder and uploads what it writes
(worker/staging.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

if TYPE_CHECKING:
    from app.settings import Settings

# Ids are `<prefix>_<hex>`; a key is slash-separated segments of that alphabet plus a suffix.
_KEY_RE = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)*(\.[a-z]+)?$")


class InvalidKey(ValueError):
    pass


class DamagedObject(OSError):
    """A download whose size or digest differs from what was stored (a torn transfer, or an
    object damaged in the store); nothing is left at the destination."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # seconds since the epoch


CHUNK = 1 << 20  # bytes read at a time when hashing or copying


def check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key) or len(key) > 255:
        raise InvalidKey(f"storage key {key!r} is not a server-generated key")
    return key


def finetune_input_key(tenant_id: str, finetune_id: str, index: int) -> str:
    return check_key(f"tenants/{tenant_id}/finetunes/{finetune_id}/inputs/{index:03d}.jpg")


def finetune_prefix(tenant_id: str, finetune_id: str) -> str:
    """Everything stored for one fine-tune: photos and checkpoints (not its adapter)."""
    return check_key(f"tenants/{tenant_id}/finetunes/{finetune_id}")


def finetune_samples_prefix(tenant_id: str, finetune_id: str) -> str:
    """A fine-tune's progress images: outside its own folder, whose photos and checkpoints go
    when the job ends; these stay until the fine-tune is deleted."""
    return check_key(f"tenants/{tenant_id}/samples/{finetune_id}")


def finetune_sample_key(tenant_id: str, finetune_id: str, step: int, index: int) -> str:
    return check_key(f"{finetune_samples_prefix(tenant_id, finetune_id)}/{step:05d}_{index}.png")


def finetune_checkpoints_prefix(tenant_id: str, finetune_id: str) -> str:
    """The adapters a fine-tune with keep_checkpoints kept at its progress-image steps: like
    its progress images, outside its own folder, so they stay until the fine-tune is deleted
    (worker/files.py names each attempt's file)."""
    return check_key(f"tenants/{tenant_id}/checkpoints/{finetune_id}")


def generation_prefix(tenant_id: str, generation_id: str) -> str:
    return check_key(f"tenants/{tenant_id}/generations/{generation_id}")


def tenant_prefix(tenant_id: str) -> str:
    return check_key(f"tenants/{tenant_id}")


def adapter_key(tenant_id: str, adapter_id: str) -> str:
    return check_key(f"tenants/{tenant_id}/adapters/{adapter_id}.safetensors")


def export_key(tenant_id: str, export_id: str) -> str:
    return check_key(f"tenants/{tenant_id}/exports/{export_id}.safetensors")


def generated_image_key(tenant_id: str, generation_id: str, index: int) -> str:
    return check_key(f"tenants/{tenant_id}/generations/{generation_id}/{index:03d}.png")


def iter_chunks(f: BinaryIO, chunk_size: int = 1 << 16) -> Iterator[bytes]:
    """Stream an opened file in fixed-size chunks and close it, for HTTP responses.

    (Iterating a binary file directly splits it at newline bytes: one huge chunk per adapter.)
    """
    with f:
        while chunk := f.read(chunk_size):
            yield chunk


class Storage(Protocol):
    """What the API and the worker do with stored files. Every write is all-or-nothing: a
    reader sees the whole old object, the whole new one, or none. Missing keys raise
    FileNotFoundError."""

    def put(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None:
        """Store the local file `path` under `key` (streamed, not read into memory)."""
        ...

    def open(self, key: str) -> BinaryIO: ...

    def get_file(self, key: str, dest: Path) -> None:
        """Copy the object to the local file `dest`, checked against the stored size and
        digest (DamagedObject when they differ)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def collect_unfinished(self, older_than: float) -> list[str]:
        """Remove what writes that never finished left behind (a process killed mid-write)
        and was begun before the timestamp `older_than`; what it removed. `list` never shows
        such leftovers, so the orphan collector cannot find them as objects."""
        ...

    def list(self, prefix: str) -> Iterator[StoredObject]:
        """Every object under `prefix` (a folder-like key), in no particular order."""
        ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove every file under `prefix` (a folder-like key); no error when there is none."""
        ...

    def init(self) -> str:
        """Create the store's root (folder, bucket) when it is missing; says what it did."""
        ...

    def download_url(
        self, key: str, *, filename: str | None, media_type: str, expires_s: float
    ) -> str | None:
        """A URL a client can fetch the object from directly for `expires_s` seconds, served
        as an attachment named `filename` (None: inline), or None when this backend has none
        (the API then streams the file itself)."""
        ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def replacing(dest: Path) -> Iterator[BinaryIO]:
    """A file open for writing that replaces `dest` when the block ends: written beside it
    under a temporary name and renamed, so `dest` is never half written; when the block raises,
    the temporary file goes and `dest` stays as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_size(*, what: str, size: int, got: int) -> None:
    if got != size:
        raise DamagedObject(f"{what}: got {got} bytes, {size} were stored")


class LocalStorage:
    """Files in a local directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        # Defence in depth: the key regex already excludes "..", absolute paths and backslashes.
        if not path.is_relative_to(self.root):
            raise InvalidKey(f"storage key {key!r} leaves the storage root")
        return path

    def put(self, key: str, data: bytes) -> None:
        with replacing(self.path(key)) as f:
            f.write(data)

    def put_file(self, key: str, path: Path) -> None:
        with replacing(self.path(key)) as out, path.open("rb") as src:
            shutil.copyfileobj(src, out, CHUNK)

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def get_file(self, key: str, dest: Path) -> None:
        # Nothing travels over a network here; the copy is checked against the file's size
        # (this backend keeps no digest).
        with replacing(dest) as out, self.path(key).open("rb") as src:
            size = os.fstat(src.fileno()).st_size
            shutil.copyfileobj(src, out, CHUNK)
            check_size(what=key, size=size, got=out.tell())

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def collect_unfinished(self, older_than: float) -> list[str]:
        # Keys never begin with "." (check_key), so a dot-file is a temporary one (`replacing`
        # here, a checkpoint's in tuneqdm_core) whose writer died before its rename.
        removed = []
        for path in self.root.rglob(".*"):
            try:
                if path.is_file() and path.stat().st_mtime < older_than:
                    path.unlink()
                    removed.append(path.relative_to(self.root).as_posix())
            except FileNotFoundError:
                continue  # renamed or removed meanwhile
        return removed

    def list(self, prefix: str) -> Iterator[StoredObject]:
        folder = self.path(prefix)
        if not folder.is_dir():
            return
        for path in folder.rglob("*"):
            # Temporary files of a write in flight are not objects yet.
            if path.name.startswith(".") or not path.is_file():
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # deleted meanwhile
            key = path.relative_to(self.root).as_posix()
            yield StoredObject(key=key, size=stat.st_size, modified=stat.st_mtime)

    def init(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        return f"local storage in {self.root}"

    def download_url(
        self, key: str, *, filename: str | None, media_type: str, expires_s: float
    ) -> str | None:
        return None

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        # Drop now-empty parent folders so a deleted job leaves no trace, stopping at the root.
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def delete_prefix(self, prefix: str) -> None:
        path = self.path(prefix)
        if path == self.root:
            raise InvalidKey("refusing to delete the whole storage root")
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            raise OSError(f"could not remove everything under {prefix}")
        self.delete(prefix)  # only prunes the now-empty parents


def storage_from_settings(settings: Settings) -> Storage:
    """The backend TUNEQDM_STORAGE_BACKEND names; the API and the worker both use this."""
    if settings.storage_backend == "s3":
        assert settings.s3_bucket is not None  # Settings refuses s3 without a bucket
        from app.s3_storage import S3Storage  # boto3 only where S3 is used

        return S3Storage(
            bucket=settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
            region=settings.s3_region,
        )
    return LocalStorage(settings.resolved_storage_dir)
