"""Exceptions from training or sampling, turned into messages a user can act on."""

from __future__ import annotations

import errno
from pathlib import Path

OOM_HINT = (
    "the GPU ran out of memory{where}; retry with a lower resolution or batch_size, or with "
    "gradient_checkpointing=true"
)


def is_out_of_memory(exc: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, and the RuntimeError older torch raises, both say so.
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def user_message(exc: BaseException, *, storage_root: Path, what: str) -> str:
    """One sentence for the job's `error`; server paths never reach the user."""
    from tuneqdm_core.images import ImageError
    from tuneqdm_core.serialization import AdapterFileError

    if is_out_of_memory(exc):
        return OOM_HINT.format(where=f" while running the {what}")
    if isinstance(exc, ImageError):
        text = str(exc).replace(str(storage_root) + "/", "")
        return f"an uploaded photo could not be used ({text}); upload PNG/JPEG/WebP photos again"
    if isinstance(exc, AdapterFileError):
        return (
            "the adapter file does not fit this service's base model; fine-tune the subject "
            "again on this base"
        )
    if isinstance(exc, FileNotFoundError):
        return f"a stored file of this {what} is missing; submit the job again"
    return (
        f"the worker failed while running the {what} ({type(exc).__name__}); it has been "
        "logged, submit the job again or contact the operator"
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def transient_reason(exc: BaseException) -> str | None:
    """Why `exc` is an infrastructure fault worth another attempt (None: it is not).

    A database blip or a full disk is the service's fault, not the job's: the job goes back to
    the queue (its checkpoint kept) instead of failing for good. Out of memory is not retried.
    """
    from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

    from app.storage import DamagedObject

    for error in _chain(exc):
        if isinstance(error, OperationalError | InterfaceError | DisconnectionError):
            return "the worker lost its connection to the database; retrying"
        if isinstance(error, DamagedObject):
            return "a stored file arrived damaged at the worker; retrying"
        # botocore's connection and timeout errors (not imported: the local backend runs
        # without boto3), after its own retries gave up.
        if type(error).__module__.startswith("botocore") and (
            "Connect" in type(error).__name__ or "Timeout" in type(error).__name__
        ):
            return "the worker could not reach the object storage; retrying"
        no_space = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        # safetensors reports the OS error in its message only.
        if no_space or "No space left on device" in str(error):
            return "the worker's disk was full while saving this job's files; retrying"
    return None
