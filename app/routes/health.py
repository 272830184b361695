"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: it can do work)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from sqlalchemy import text
from starlette.responses import Response

from app import problems
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
async def readyz(session: SessionDep, sender: SenderDep) -> HealthPublic | Response:
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
    return problems.response(
        503,
        "not ready: " + ", ".join(f"{k} {v}" for k, v in checks.items() if v != "ok"),
        extra={"checks": checks},
    )
