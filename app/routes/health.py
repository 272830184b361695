"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: it can do work)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.deps import SenderDep, SessionDep
from app.schemas import HealthPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
def healthz() -> HealthPublic:
    return HealthPublic(status="ok")


@router.get(
    "/readyz",
    response_model=HealthPublic,
    responses={503: {"description": "The database or the broker is not reachable."}},
)
async def readyz(session: SessionDep, sender: SenderDep) -> HealthPublic | JSONResponse:
    checks: dict[str, str] = {}
    try:
        await asyncio.to_thread(session.execute, text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        await asyncio.to_thread(sender.ping)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"unreachable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return HealthPublic(status="ok", checks=checks)
    return JSONResponse({"detail": "not ready", "checks": checks}, status_code=503)
