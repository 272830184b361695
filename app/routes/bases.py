"""/v1/bases: the base models workers serve, their family, native size and accepted size range,
the defaults and rules of their requests, their workers (up or not) and the jobs queued for
them."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter

from app.bases import finetune_defaults, info_of, sizes_of
from app.deps import CurrentTenant, SessionDep, SettingsDep
from app.families import generation_rules
from app.models import ServedBase
from app.schemas import (
    BasePublic,
    BasesPublic,
    FinetuneDefaultsPublic,
    GenerationDefaultsPublic,
    QueuedPublic,
    SizeRangePublic,
)
from app.services import bases as svc
from app.settings import Settings

router = APIRouter(prefix="/v1/bases", tags=["bases"])

ERRORS: dict[int | str, dict[str, str]] = {
    401: {"description": "Missing or invalid API key."},
    404: {"description": "No base with this name."},
}


def _public(
    row: ServedBase,
    settings: Settings,
    queued: dict[str, dict[str, int]],
    up_since: datetime,
) -> BasePublic:
    info = info_of(row)
    sizes = sizes_of(info, settings)
    rules = generation_rules(info.family, info.guidance)
    counts = queued.get(row.name, {})
    return BasePublic.from_row(
        row,
        SizeRangePublic(default=sizes.default, min=sizes.min, max=sizes.max),
        generation=GenerationDefaultsPublic(
            steps=rules.steps,
            guidance_scale=rules.guidance_scale,
            guidance=rules.guidance,
            guidance_meaning=rules.describe_guidance(),
            scheduler=rules.scheduler,
            schedulers=list(rules.schedulers),
            negative_prompt=rules.negative_prompt,
        ),
        finetune=FinetuneDefaultsPublic(**finetune_defaults(info, sizes)),
        default=row.name == settings.base_model,
        queued=QueuedPublic(
            finetune=counts.get("finetune", 0), generation=counts.get("generation", 0)
        ),
        up_since=up_since,
    )


@router.get("", response_model=BasesPublic, responses={401: ERRORS[401]})
def list_bases(session: SessionDep, settings: SettingsDep, _tenant: CurrentTenant) -> BasesPublic:
    rows = svc.list_bases(session=session)
    queued = svc.queued_jobs(session=session)
    since = svc.up_since(session, settings)
    return BasesPublic(data=[_public(r, settings, queued, since) for r in rows], count=len(rows))


@router.get("/{name:path}", response_model=BasePublic, responses=ERRORS)
def get_base(
    session: SessionDep, settings: SettingsDep, _tenant: CurrentTenant, name: str
) -> BasePublic:
    row = svc.get_base(session=session, name=name)
    queued = svc.queued_jobs(session=session)
    return _public(row, settings, queued, svc.up_since(session, settings))
