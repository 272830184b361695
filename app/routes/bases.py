"""/v1/bases: the base models workers serve, their native size and accepted size range."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentTenant, SessionDep, SettingsDep
from app.models import ServedBase
from app.schemas import BasePublic, BasesPublic, SizeRangePublic
from app.services import bases as svc
from app.settings import Settings

router = APIRouter(prefix="/v1/bases", tags=["bases"])

ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or invalid API key."},
    404: {"description": "No base with this name."},
}


def _public(row: ServedBase, settings: Settings) -> BasePublic:
    sizes = svc.sizes_of(row.native_resolution, settings)
    return BasePublic.from_row(
        row, SizeRangePublic(default=sizes.default, min=sizes.min, max=sizes.max)
    )


@router.get("", response_model=BasesPublic, responses={401: ERRORS[401]})
def list_bases(session: SessionDep, settings: SettingsDep, _tenant: CurrentTenant) -> BasesPublic:
    rows = svc.list_bases(session=session)
    return BasesPublic(data=[_public(r, settings) for r in rows], count=len(rows))


@router.get("/{name:path}", response_model=BasePublic, responses=ERRORS)
def get_base(
    session: SessionDep, settings: SettingsDep, _tenant: CurrentTenant, name: str
) -> BasePublic:
    return _public(svc.get_base(session=session, name=name), settings)
