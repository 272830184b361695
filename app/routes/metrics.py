"""`GET /metrics`: Prometheus text format (app/metrics.py says what is in it and why)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import metrics
from app.deps import SenderDep, SessionDep, SettingsDep

router = APIRouter(tags=["operations"])


# Outside the OpenAPI document: it is for Prometheus, not for API clients, and needs no key
# (it shows counts and timings only; restrict it at the network edge like /readyz).
@router.get("/metrics", include_in_schema=False)
def get_metrics(
    request: Request, session: SessionDep, sender: SenderDep, settings: SettingsDep
) -> Response:
    body = metrics.render(request.app, session=session, sender=sender, settings=settings)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
