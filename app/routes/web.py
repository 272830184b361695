"""The web page at `/`: static HTML, JavaScript and CSS from app/static, no build step.

The page talks to the same /v1 API as any client, with the key the user types in.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"

# The page's own files only: no inline script or style (an injected <script> or attribute
# handler does not run), no other origin to send the API key to, images from the API as blob:
# URLs, and no framing (clickjacking).
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(
            STATIC / "index.html",
            media_type="text/html",
            headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
        )

    # The page's icon: a small SVG of its own (the page links /favicon.svg; browsers that ask
    # for /favicon.ico get the same file), so no request for it leaves the service or 404s.
    @app.get("/favicon.svg", include_in_schema=False)
    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(
            STATIC / "favicon.svg",
            media_type="image/svg+xml",
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Cache-Control": "public, max-age=86400",
            },
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
