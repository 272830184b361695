"""/v1/adapters/{id}/exports and /export: an adapter as a LoRA file or a merged UNet.

A worker makes the file (the API has no torch): POST asks for it, the list shows its status and
attempts, /cancel cancels it, GET /export downloads it once it succeeded (docs/api.md,
"Exports").
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import StreamingResponse

from app.deps import CurrentTenant, SenderDep, SessionDep, SettingsDep, StorageDep
from app.downloads import REDIRECT_DOC, file_response
from app.schemas import ExportCreate, ExportPublic, ExportQuery, ExportsPublic
from app.services import exports as svc

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or invalid API key."},
    404: {"description": "No such adapter (or export) for this tenant."},
}


@router.post(
    "/{adapter_id}/exports",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ExportPublic,
    responses={
        **ERRORS,
        200: {
            "description": "This export exists already (finished or on its way).",
            "model": ExportPublic,
        },
        422: {"description": "Invalid request; the detail says which field."},
        503: {"description": "The task queue is unreachable; nothing was stored."},
    },
)
def create_export(
    session: SessionDep,
    settings: SettingsDep,
    sender: SenderDep,
    tenant: CurrentTenant,
    adapter_id: str,
    data: ExportCreate,
    response: Response,
) -> ExportPublic:
    row, queued = svc.create_export(
        session=session,
        sender=sender,
        settings=settings,
        tenant=tenant,
        adapter_id=adapter_id,
        data=data,
    )
    if not queued:
        response.status_code = status.HTTP_200_OK
    return ExportPublic.from_row(row)


@router.get("/{adapter_id}/exports", response_model=ExportsPublic, responses=ERRORS)
def list_exports(session: SessionDep, tenant: CurrentTenant, adapter_id: str) -> ExportsPublic:
    rows = svc.list_exports(session=session, tenant=tenant, adapter_id=adapter_id)
    return ExportsPublic(data=[ExportPublic.from_row(r) for r in rows], count=len(rows))


@router.post(
    "/{adapter_id}/exports/{export_id}/cancel",
    response_model=ExportPublic,
    responses={**ERRORS, 409: {"description": "The export has already ended."}},
)
def cancel_export(
    session: SessionDep, tenant: CurrentTenant, adapter_id: str, export_id: str
) -> ExportPublic:
    row = svc.cancel_export(
        session=session, tenant=tenant, adapter_id=adapter_id, export_id=export_id
    )
    return ExportPublic.from_row(row)


@router.get(
    "/{adapter_id}/export",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {
            "description": "The export's safetensors file.",
            "content": {"application/octet-stream": {}},
        },
        307: REDIRECT_DOC,
        409: {"description": "The export is still queued or running, or it failed."},
    },
)
def download_export(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    tenant: CurrentTenant,
    adapter_id: str,
    query: Annotated[ExportQuery, Query()],
) -> Response:
    row = svc.export_file(session=session, tenant=tenant, adapter_id=adapter_id, data=query)
    assert row.storage_key is not None  # export_file returns finished exports only
    return file_response(
        storage,
        settings,
        row.storage_key,
        media_type="application/octet-stream",
        filename=f"{adapter_id}-{row.variant}.safetensors",
        missing=f"the file of export {row.id} is missing from storage",
    )
