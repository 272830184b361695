"""File storage for uploads, adapters and generated images.

Layout under the storage root (keys are built here from server-side ids only, never from user
file names, and every key is checked to resolve inside the root):

    tenants/<tenant_id>/finetunes/<finetune_id>/inputs/<nnn>.jpg     uploaded photos, re-encoded
    tenants/<tenant_id>/finetunes/<finetune_id>/checkpoint/          training checkpoints (worker)
    tenants/<tenant_id>/samples/<finetune_id>/<step>_<i>.png         progress images (worker)
    tenants/<tenant_id>/adapters/<adapter_id>.safetensors            adapter files (worker)
    tenants/<tenant_id>/exports/<export_id>.safetensors              LoRA / merged UNet (worker)
    tenants/<tenant_id>/generations/<generation_id>/<nnn>.png        generated images (worker)

`LocalStorage` is the only backend today; an S3 backend would implement the same `Storage`
protocol.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

# Ids are `<prefix>_<hex>`; a key is slash-separated segments of that alphabet plus a suffix.
_KEY_RE = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)*(\.[a-z]+)?$")


class InvalidKey(ValueError):
    pass


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
    def put(self, key: str, data: bytes) -> None: ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove every file under `prefix` (a folder-like key); no error when there is none."""
        ...


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
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def open(self, key: str) -> BinaryIO:
        return self.path(key).open("rb")

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

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
