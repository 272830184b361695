"""Stored files as HTTP responses: streamed through the API, or a redirect to the store.

With TUNEQDM_DOWNLOAD_REDIRECT and a backend that can sign URLs (s3), a download answers 307
with a presigned URL valid for TUNEQDM_DOWNLOAD_REDIRECT_EXPIRY_S, so a multi-GB export does
not pass through an API replica; otherwise the API streams the file in chunks.
"""

from __future__ import annotations

from fastapi import Response
from fastapi.responses import RedirectResponse, StreamingResponse

from app.errors import NotFound
from app.settings import Settings
from app.storage import Storage, iter_chunks

# For the routes' OpenAPI `responses`.
REDIRECT_DOC = {
    "description": "With TUNEQDM_DOWNLOAD_REDIRECT on an S3 store: the file's presigned URL "
    "(Location), valid for TUNEQDM_DOWNLOAD_REDIRECT_EXPIRY_S."
}


def file_response(
    storage: Storage,
    settings: Settings,
    key: str,
    *,
    media_type: str,
    filename: str | None,
    missing: str,
) -> Response:
    """The stored file `key` (attachment `filename`, or inline when None); 404 `missing` when
    it is not in the store."""
    if settings.download_redirect:
        # Checked here: a presigned URL of a missing object would fail at the store instead.
        if not storage.exists(key):
            raise NotFound(missing)
        url = storage.download_url(
            key,
            filename=filename,
            media_type=media_type,
            expires_s=settings.download_redirect_expiry_s,
        )
        if url is not None:
            return RedirectResponse(url, status_code=307)
    return stream_response(storage, key, media_type=media_type, filename=filename, missing=missing)


def stream_response(
    storage: Storage,
    key: str,
    *,
    media_type: str,
    filename: str | None = None,
    missing: str,
) -> StreamingResponse:
    """The stored file `key` streamed through the API in chunks (attachment `filename`, or
    inline when None); 404 `missing` when it is not in the store."""
    try:
        f = storage.open(key)
    except FileNotFoundError:
        raise NotFound(missing) from None
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'} if filename else None
    return StreamingResponse(iter_chunks(f), media_type=media_type, headers=headers)
