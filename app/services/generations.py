"""Generation jobs: check the request against the limits and the adapter, commit, enqueue."""

from __future__ import annotations

import logging
import secrets

from sqlalchemy import Select, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from app import budget, idempotency, metrics
from app.bases import BaseInfo, sizes_of
from app.errors import Conflict, InvalidInput, NotFound
from app.families import GenerationRules, generation_rules
from app.ids import looks_like_id, new_id
from app.models import ACTIVE_STATUSES, Adapter, GeneratedImage, GenerationJob, Tenant, utcnow
from app.outbox import check_events, record_final
from app.queue import GENERATE_QUEUE, GENERATE_TASK, TaskSender, base_queue
from app.schemas import SEED_MAX, GenerationCreate
from app.services import quotas, retention
from app.services.bases import known_bases, resolve_base
from app.services.common import optional_text, page, required_text
from app.settings import Settings
from app.storage import Storage
from app.webhooks import check_webhook_url

log = logging.getLogger(__name__)


def _check_family(
    data: GenerationCreate, base: BaseInfo, negative: str | None
) -> tuple[int, float, str]:
    """The family's rules (app/families.py): (steps, guidance_scale, scheduler), with the
    family's defaults where the request sends none. A value the base's family does not use
    is refused rather than ignored: the image would not be the one asked for."""
    rules: GenerationRules = generation_rules(base.family, base.guidance)
    which = f"base {base.name!r} (family {base.family})"
    if negative is not None and not rules.negative_prompt:
        raise InvalidInput(
            f"negative_prompt is not used by {which}: its guidance is distilled into the model, "
            "with no negative pass; leave it out",
            field="negative_prompt",
        )
    if data.guidance_scale is not None and rules.guidance == "none":
        raise InvalidInput(
            f"guidance_scale is not used by {which}: the model was distilled to run without "
            "guidance; leave it out",
            field="guidance_scale",
        )
    scheduler = rules.scheduler if data.scheduler is None else data.scheduler
    if scheduler not in rules.schedulers:
        raise InvalidInput(
            f"scheduler={scheduler!r} is not one {which} runs; send one of "
            f"{', '.join(map(repr, rules.schedulers))} (or omit it for {rules.scheduler!r})",
            field="scheduler",
        )
    steps = rules.steps if data.steps is None else data.steps
    guidance = rules.guidance_scale if data.guidance_scale is None else data.guidance_scale
    return steps, guidance, scheduler


def _check_limits(
    data: GenerationCreate, steps: int, settings: Settings, base: BaseInfo
) -> tuple[int, int]:
    """Check the request's limits; returns (width, height) with the base's defaults filled in.
    With compare_base every image is made twice (adapter and base): it counts twice."""
    sides = 2 if data.compare_base else 1
    if data.num_images * sides > settings.max_num_images:
        doubled = " × 2 for compare_base" if data.compare_base else ""
        raise InvalidInput(
            f"num_images={data.num_images}{doubled} is above the limit of "
            f"{settings.max_num_images} images (TUNEQDM_MAX_NUM_IMAGES)"
        )
    if steps > settings.max_generation_steps:
        raise InvalidInput(f"steps={steps} is above the limit of {settings.max_generation_steps}")
    sizes = sizes_of(base, settings)
    width = sizes.default if data.width is None else data.width
    height = sizes.default if data.height is None else data.height
    for field, value in (("width", width), ("height", height)):
        if not sizes.accepts(value):
            raise InvalidInput(
                f"{field}={value} must be {sizes.describe()} for base {base.name!r} (native "
                f"{base.native_resolution} px, family {base.family}; TUNEQDM_MIN_SIZE_FACTOR / "
                "TUNEQDM_MAX_SIZE_FACTOR set the range)",
                field=field,
            )
    budget.check_generation(
        num_images=data.num_images,
        compare_base=data.compare_base,
        steps=steps,
        width=width,
        height=height,
        native=base.native_resolution,
        settings=settings,
    )
    return width, height


def _check_adapter(session: Session, tenant: Tenant, adapter_id: str) -> Adapter:
    """The tenant's adapter, ready to use; its base is the generation's."""
    adapter = None
    if looks_like_id(adapter_id, "ad"):
        adapter = session.scalar(
            select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant.id)
        )
    if adapter is None:
        # Same answer for "unknown" and "another tenant's": ids must not be probeable.
        raise InvalidInput(
            f"adapter_id {adapter_id!r} does not name one of your adapters; list them with "
            "GET /v1/adapters, or send adapter_id=null for the base model"
        )
    job = adapter.finetune_job
    if job is not None and job.status != "succeeded":
        raise Conflict(
            f"adapter {adapter_id} comes from fine-tune job {job.id}, which is {job.status}; "
            "wait until it has succeeded"
        )
    return adapter


def _base_of(
    session: Session, settings: Settings, data: GenerationCreate, adapter: Adapter | None
) -> BaseInfo:
    """The generation's base: its adapter's (a `base` naming another is refused), else the
    requested one, else the default. An adapter whose base is not served (any more) is a
    conflict: no worker would ever run the job."""
    if adapter is None:
        return resolve_base(session=session, settings=settings, name=data.base)
    if data.base and data.base != adapter.base_model:
        raise InvalidInput(
            f"adapter {adapter.id} was trained on base {adapter.base_model!r}, not "
            f"{data.base!r}; omit base (it follows the adapter) or use an adapter of that base"
        )
    known = known_bases(session=session, settings=settings)
    if adapter.base_model not in known:
        raise Conflict(
            f"adapter {adapter.id} was trained on base model {adapter.base_model!r}, which this "
            f"service does not serve (it serves {', '.join(map(repr, known))}); fine-tune again "
            "on one of those"
        )
    return resolve_base(session=session, settings=settings, name=adapter.base_model)


def _replay(
    session: Session,
    tenant: Tenant,
    key: str,
    fingerprint: str,
    settings: Settings,
    *,
    expire: bool = True,
) -> GenerationJob | None:
    return idempotency.replay(
        session,
        _query(tenant).where(GenerationJob.idempotency_key == key),
        key=key,
        fingerprint=fingerprint,
        ttl_s=settings.idempotency_ttl_s,
        expire=expire,
    )


def create_generation(
    *,
    session: Session,
    sender: TaskSender,
    settings: Settings,
    tenant: Tenant,
    data: GenerationCreate,
    idempotency_key: str | None = None,
) -> GenerationJob:
    key = idempotency.check_key(idempotency_key)
    fingerprint = idempotency.fingerprint(data.model_dump(mode="json"))
    if key is not None:
        existing = _replay(session, tenant, key, fingerprint, settings)
        if existing is not None:
            return existing
    limit = settings.max_prompt_chars
    prompt = required_text(data.prompt, field="prompt", max_chars=limit)
    negative = optional_text(data.negative_prompt, field="negative_prompt", max_chars=limit)
    if data.compare_base and data.adapter_id is None:
        raise InvalidInput(
            "compare_base=true sets the base's images beside an adapter's; give adapter_id, or "
            "leave compare_base out for the base model alone"
        )
    adapter = None
    if data.adapter_id is not None:
        adapter = _check_adapter(session, tenant, data.adapter_id)
    base = _base_of(session, settings, data, adapter)
    steps, guidance_scale, scheduler = _check_family(data, base, negative)
    width, height = _check_limits(data, steps, settings, base)
    webhook_url = None
    if data.webhook_url is not None and data.webhook_url.strip():
        webhook_url = check_webhook_url(
            data.webhook_url.strip(),
            allow_private=settings.allow_private_webhooks,
            ports=settings.webhook_ports,
        )
    webhook_events = check_events("generation", data.webhook_events, webhook_url=webhook_url)
    quotas.check_new_job(session=session, tenant=tenant, settings=settings)
    seed = data.seed if data.seed is not None else secrets.randbelow(SEED_MAX + 1)
    gen = GenerationJob(
        id=new_id("gen"),
        tenant_id=tenant.id,
        adapter_id=data.adapter_id,
        base_model=base.name,
        status="queued",
        prompt=prompt,
        negative_prompt=negative,
        num_images=data.num_images,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        width=width,
        height=height,
        scheduler=scheduler,
        compare_base=data.compare_base,
        time_limit_s=settings.generation_time_limit_s,
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        idempotency_key=key,
        idempotency_fingerprint=fingerprint if key is not None else None,
    )
    session.add(gen)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        # A concurrent request with the same Idempotency-Key won the race: answer with its job
        # (or 409 if that request was another one).
        if key is not None:
            existing = _replay(session, tenant, key, fingerprint, settings, expire=False)
            if existing is not None:
                return existing
        raise
    try:
        sender.send(GENERATE_TASK, gen.id, queue=base_queue(GENERATE_QUEUE, gen.base_model))
    except Exception:
        log.exception("enqueue of %s failed; removing the job", gen.id)
        session.delete(gen)
        session.commit()
        raise
    return gen


def _query(tenant: Tenant) -> Select[GenerationJob]:
    return (
        select(GenerationJob)
        .where(GenerationJob.tenant_id == tenant.id)
        .options(selectinload(GenerationJob.images), selectinload(GenerationJob.webhook))
    )


def get_generation(*, session: Session, tenant: Tenant, generation_id: str) -> GenerationJob:
    gen = None
    if looks_like_id(generation_id, "gen"):
        gen = session.scalar(_query(tenant).where(GenerationJob.id == generation_id))
    if gen is None:
        raise NotFound(f"no generation with id {generation_id!r}")
    return gen


def list_generations(
    *, session: Session, tenant: Tenant, status: str | None, limit: int, offset: int
) -> tuple[list[GenerationJob], int]:
    stmt = _query(tenant)
    if status is not None:
        stmt = stmt.where(GenerationJob.status == status)
    stmt = stmt.order_by(GenerationJob.created_at.desc(), GenerationJob.id)
    return page(session, stmt, limit=limit, offset=offset)


def get_generated_image(
    *, session: Session, tenant: Tenant, generation_id: str, index: int
) -> GeneratedImage:
    gen = get_generation(session=session, tenant=tenant, generation_id=generation_id)
    for img in gen.images:
        if img.index == index:
            return img
    raise NotFound(
        f"generation {generation_id} has no image {index} (status {gen.status}, "
        f"{len(gen.images)} image(s) ready)"
    )


def cancel_generation(*, session: Session, tenant: Tenant, generation_id: str) -> GenerationJob:
    gen = get_generation(session=session, tenant=tenant, generation_id=generation_id)
    now = utcnow()
    # Conditional, like a fine-tune's cancel: a worker finishing at the same moment wins or
    # loses cleanly. The worker stops within one UNet call of its next heartbeat, or, when the
    # generation shares its loop with others, drops only this generation's images.
    result = session.execute(
        update(GenerationJob)
        .where(GenerationJob.id == gen.id, GenerationJob.status.in_(ACTIVE_STATUSES))
        .values(status="canceled", finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        record_final(session, GenerationJob, gen.id)  # commits with the canceled state
    session.commit()
    session.refresh(gen)
    if result.rowcount:  # type: ignore[attr-defined]
        metrics.job_canceled("generation", gen.base_model)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise Conflict(
            f"generation {gen.id} is already {gen.status}; only queued or running generations "
            "can be canceled"
        )
    return gen


def delete_generation(
    *, session: Session, storage: Storage, tenant: Tenant, generation_id: str
) -> None:
    gen = get_generation(session=session, tenant=tenant, generation_id=generation_id)
    retention.delete_generation(session=session, storage=storage, gen=gen)
