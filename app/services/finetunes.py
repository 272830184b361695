"""Fine-tune jobs: validate everything, store the photos, commit the row, then enqueue."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydantic import ValidationError
from sqlalchemy import Select, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from app import budget, idempotency, metrics
from app import storage as st
from app.bases import BaseInfo, finetune_defaults, size_range, sizes_of
from app.errors import Conflict, InvalidInput, NotFound
from app.events import record_event
from app.families import finetune_overrides
from app.ids import looks_like_id, new_id
from app.images import CheckedImage, check_image, read_limited
from app.models import ACTIVE_STATUSES, FinetuneImage, FinetuneJob, Tenant, utcnow
from app.outbox import check_events, record_final
from app.queue import FINETUNE_QUEUE, FINETUNE_TASK, TaskSender, base_queue
from app.schemas import FinetuneParams
from app.services import quotas, retention
from app.services.bases import resolve_base
from app.services.common import optional_text, page, required_text
from app.settings import Settings
from app.webhooks import check_webhook_url

log = logging.getLogger(__name__)

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass
class Upload:
    filename: str | None
    stream: BinaryIO
    label: str | None = None  # how messages name it; default images[i]


@dataclass
class FinetuneForm:
    instance_prompt: str
    class_prompt: str | None = None
    name: str | None = None
    params: str | None = None  # JSON text, as sent in the multipart form
    webhook_url: str | None = None
    webhook_events: list[str] | None = None
    token: str = "sks"
    idempotency_key: str | None = None
    base: str | None = None  # None: TUNEQDM_BASE_MODEL


def parse_params(raw: str | None, overrides: dict[str, Any] | None = None) -> FinetuneParams:
    """The params as sent, with the base family's `overrides` of FinetuneParams' defaults
    (app/families.py) for the keys the JSON object omits."""
    text = raw if raw and raw.strip() else "{}"
    try:
        params = FinetuneParams.model_validate_json(text)
        sent = json.loads(text)  # valid: a JSON object
        omitted = {k: v for k, v in (overrides or {}).items() if k not in sent}
        if omitted:
            # Validated again as sent plus the overrides, so that what derives from them
            # (sample_every from steps) follows.
            params = FinetuneParams.model_validate_json(json.dumps({**omitted, **sent}))
        return params
    except ValidationError as exc:
        errors = exc.errors()
        fields = [
            "params." + ".".join(str(p) for p in e["loc"]) if e["loc"] else "params" for e in errors
        ]
        problems = "; ".join(f"{f}: {e['msg']}" for f, e in zip(fields, errors, strict=True))
        raise InvalidInput(f"params is not valid: {problems}", field=fields[0]) from None


def _validate_form(form: FinetuneForm, settings: Settings, base: BaseInfo) -> FinetuneJob:
    """Check every form field and return the (unsaved) job row they describe."""
    limit = settings.max_prompt_chars
    instance_prompt = required_text(form.instance_prompt, field="instance_prompt", max_chars=limit)
    class_prompt = optional_text(form.class_prompt, field="class_prompt", max_chars=limit)
    name = optional_text(form.name, field="name", max_chars=100)
    if not TOKEN_RE.fullmatch(form.token):
        raise InvalidInput(
            "token must be 1-32 letters, digits, '_' or '-' (a rare word such as 'sks')"
        )
    if settings.require_identifier_token and not re.search(
        rf"(?<![\w-]){re.escape(form.token)}(?![\w-])", instance_prompt
    ):
        raise InvalidInput(
            f"instance_prompt must contain the identifier token {form.token!r} as a word, e.g. "
            f"'a photo of {form.token} dog'"
        )
    sizes = sizes_of(base, settings)
    params = parse_params(form.params, finetune_overrides(base.family))
    if params.bits is None:
        # Stored resolved, like the resolution (the registry holds only 4 and 8).
        params.bits = 8 if base.bits == 8 else 4
    elif params.bits != base.bits:
        raise InvalidInput(
            f"params.bits={params.bits} but base {base.name!r} is served at {base.bits} bits; "
            f"send bits={base.bits} (or omit it), or name a base served at {params.bits} bits"
        )
    params.validation_prompts = [
        required_text(p, field=f"params.validation_prompts[{i}]", max_chars=limit)
        for i, p in enumerate(params.validation_prompts)
    ]
    if params.resolution is None:
        # Stored resolved, so the worker never re-applies a default.
        params.resolution = int(finetune_defaults(base, sizes)["resolution"])
    elif not sizes.accepts(params.resolution):
        raise InvalidInput(
            f"params.resolution={params.resolution} must be {sizes.describe()} for base "
            f"{base.name!r} (native {base.native_resolution} px, family {base.family}; "
            "TUNEQDM_MIN_SIZE_FACTOR / TUNEQDM_MAX_SIZE_FACTOR set the range)",
            field="params.resolution",
        )
    prior = class_prompt is not None and params.num_class_images > 0
    budget.check_finetune(params, prior=prior, native=base.native_resolution, settings=settings)
    webhook_url = None
    if form.webhook_url is not None and form.webhook_url.strip():
        webhook_url = check_webhook_url(
            form.webhook_url.strip(),
            allow_private=settings.allow_private_webhooks,
            ports=settings.webhook_ports,
        )
    webhook_events = check_events("finetune", form.webhook_events, webhook_url=webhook_url)
    job = FinetuneJob(
        name=name,
        status="queued",
        instance_prompt=instance_prompt,
        class_prompt=class_prompt,
        token=form.token,
        base_model=base.name,
        params=params.model_dump(mode="json"),
        webhook_url=webhook_url,
        webhook_events=webhook_events,
        idempotency_key=form.idempotency_key,
        progress_step=0,
        progress_total=params.steps,
        time_limit_s=settings.finetune_time_limit_s,
    )
    return job


def precheck(
    *,
    session: Session,
    settings: Settings,
    tenant: Tenant,
    form: FinetuneForm,
    uploads: list[Upload],
    urls: int = 0,
) -> int:
    """The cheap checks, before any photo is fetched or decoded: form fields, photo count
    (`uploads` and `urls` photos to fetch), the tenant's
    job and byte limits (checked again with the photos' sizes before the insert). Ends its
    read transaction, so no connection is held while the photos are decoded. Returns the
    side photos are stored at (:func:`stored_side`)."""
    key = idempotency.check_key(form.idempotency_key)
    base = resolve_base(session=session, settings=settings, name=form.base)
    _validate_form(form, settings, base)
    check_count(len(uploads) + urls, settings)
    try:
        # A repeated request answers with its job (create_finetune), limits or not.
        if (
            key is None
            or session.scalar(_query(tenant).where(FinetuneJob.idempotency_key == key)) is None
        ):
            quotas.check_new_job(session=session, tenant=tenant, settings=settings)
    finally:
        session.commit()
    return stored_side(base.native_resolution, settings)


def stored_side(native: int, settings: Settings) -> int:
    """Photos are kept at about twice the largest training size a base of this native size
    accepts: enough for any resolution a fine-tune may ask for, far less than a phone's 12 MP."""
    return round(settings.stored_photo_scale * size_range(native, settings).max)


def check_count(count: int, settings: Settings) -> None:
    """Photos sent as files, in an archive and as URLs count together."""
    if count < settings.min_images:
        raise InvalidInput(
            f"send at least {settings.min_images} photo(s) of the subject in the 'images' field "
            "(or in a .zip archive in 'images_zip', or as URLs in 'image_urls')"
        )
    if count > settings.max_images:
        raise InvalidInput(f"{count} images sent, the limit is {settings.max_images}; send fewer")


def check_upload(upload: Upload, index: int, settings: Settings, max_side: int) -> CheckedImage:
    """Read, check, downscale and re-encode one photo (CPU work: app.image_pool runs it)."""
    # Name files by position, not by their (untrusted) name, in messages too.
    what = upload.label or f"images[{index}]"
    data = read_limited(upload.stream, settings.max_image_bytes, what)
    return check_image(
        data,
        max_pixels=settings.max_image_pixels,
        what=what,
        max_side=max_side,
        quality=settings.stored_photo_quality,
    )


def _check_uploads(uploads: list[Upload], settings: Settings, max_side: int) -> list[CheckedImage]:
    check_count(len(uploads), settings)
    return [check_upload(up, i, settings, max_side) for i, up in enumerate(uploads)]


def _fingerprint(form: FinetuneForm, checked: list[CheckedImage]) -> str:
    fields = {
        "instance_prompt": form.instance_prompt,
        "class_prompt": form.class_prompt,
        "name": form.name,
        "params": idempotency.canonical_json(form.params),
        "webhook_url": form.webhook_url,
        "token": form.token,
        "base": form.base,
        # Only when given: a key's fingerprint from before this field existed still matches.
        **({"webhook_events": form.webhook_events} if form.webhook_events else {}),
    }
    return idempotency.fingerprint_digests(fields, [img.source_sha256 for img in checked])


def _replay(
    session: Session,
    tenant: Tenant,
    form: FinetuneForm,
    fingerprint: str,
    settings: Settings,
    *,
    expire: bool = True,
) -> FinetuneJob | None:
    assert form.idempotency_key is not None
    return idempotency.replay(
        session,
        _query(tenant).where(FinetuneJob.idempotency_key == form.idempotency_key),
        key=form.idempotency_key,
        fingerprint=fingerprint,
        ttl_s=settings.idempotency_ttl_s,
        expire=expire,
    )


def create_finetune(
    *,
    session: Session,
    storage: st.Storage,
    sender: TaskSender,
    settings: Settings,
    tenant: Tenant,
    form: FinetuneForm,
    uploads: list[Upload] | None = None,
    checked: list[CheckedImage] | None = None,
) -> FinetuneJob:
    """Create the job from `uploads`, or from photos already checked with `check_upload`
    (the route does that in app.image_pool, before it takes a database connection)."""
    idempotency.check_key(form.idempotency_key)
    base = resolve_base(session=session, settings=settings, name=form.base)
    if checked is None:
        side = stored_side(base.native_resolution, settings)
        checked = _check_uploads(uploads or [], settings, side)
    fingerprint = _fingerprint(form, checked)
    if form.idempotency_key is not None:
        existing = _replay(session, tenant, form, fingerprint, settings)
        if existing is not None:
            return existing

    job = _validate_form(form, settings, base)
    job.idempotency_fingerprint = fingerprint if form.idempotency_key is not None else None

    job.id = new_id("ft")
    job.tenant_id = tenant.id
    job.num_images = len(checked)
    keys = []
    try:
        for i, img in enumerate(checked):
            key = st.finetune_input_key(tenant.id, job.id, i)
            storage.put(key, img.data)
            keys.append(key)
            job.images.append(
                FinetuneImage(
                    index=i,
                    storage_key=key,
                    width=img.width,
                    height=img.height,
                    size_bytes=len(img.data),
                )
            )
        # After the photos are stored, so the tenant's row lock is held only for the checks and
        # the insert; a refused job's photos are removed below.
        quotas.check_new_job(
            session=session,
            tenant=tenant,
            settings=settings,
            adding_bytes=sum(len(img.data) for img in checked),
        )
        session.add(job)
        session.flush()
        record_event(session, job.id, "queued")
        session.commit()
    except IntegrityError:
        session.rollback()
        _remove(storage, keys)
        # A concurrent request with the same Idempotency-Key won the race: answer with its job
        # (or 409 if that request was another one).
        if form.idempotency_key is not None:
            existing = _replay(session, tenant, form, fingerprint, settings, expire=False)
            if existing is not None:
                return existing
        raise
    except BaseException:
        session.rollback()
        _remove(storage, keys)
        raise

    try:
        sender.send(FINETUNE_TASK, job.id, queue=base_queue(FINETUNE_QUEUE, job.base_model))
    except Exception:
        # Nothing half-written: a job no worker will ever see is worse than a clean 503.
        log.exception("enqueue of %s failed; removing the job", job.id)
        session.delete(job)
        session.commit()
        _remove(storage, keys)
        raise
    return job


def _remove(storage: st.Storage, keys: list[str]) -> None:
    for key in keys:
        try:
            storage.delete(key)
        except OSError:
            log.exception("could not remove %s", key)


def _query(tenant: Tenant) -> Select[FinetuneJob]:
    return (
        select(FinetuneJob)
        .where(FinetuneJob.tenant_id == tenant.id)
        .options(
            selectinload(FinetuneJob.images),
            selectinload(FinetuneJob.adapter),
            selectinload(FinetuneJob.webhook),
        )
    )


def get_finetune(*, session: Session, tenant: Tenant, finetune_id: str) -> FinetuneJob:
    job = None
    if looks_like_id(finetune_id, "ft"):
        job = session.scalar(_query(tenant).where(FinetuneJob.id == finetune_id))
    if job is None:
        raise NotFound(f"no fine-tune job with id {finetune_id!r}")
    return job


def list_finetunes(
    *, session: Session, tenant: Tenant, status: str | None, limit: int, offset: int
) -> tuple[list[FinetuneJob], int]:
    stmt = _query(tenant)
    if status is not None:
        stmt = stmt.where(FinetuneJob.status == status)
    stmt = stmt.order_by(FinetuneJob.created_at.desc(), FinetuneJob.id)
    return page(session, stmt, limit=limit, offset=offset)


def delete_finetune(
    *, session: Session, storage: st.Storage, tenant: Tenant, finetune_id: str, delete_adapter: bool
) -> None:
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    retention.delete_finetune(
        session=session, storage=storage, job=job, delete_adapter=delete_adapter
    )


def cancel_finetune(
    *,
    session: Session,
    tenant: Tenant,
    finetune_id: str,
    storage: st.Storage | None = None,
    settings: Settings | None = None,
) -> FinetuneJob:
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    was_queued = job.status == "queued"
    now = utcnow()
    # A conditional UPDATE, so a worker finishing the job at the same moment cannot be
    # overwritten; the worker stops when it sees status=canceled at its next check.
    result = session.execute(
        update(FinetuneJob)
        .where(FinetuneJob.id == job.id, FinetuneJob.status.in_(ACTIVE_STATUSES))
        # A canceled member leaves its co-training group.
        .values(status="canceled", finished_at=now, updated_at=now, group_size=None)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        record_final(session, FinetuneJob, job.id)  # commits with the canceled state
    session.commit()
    session.refresh(job)
    if result.rowcount:  # type: ignore[attr-defined]
        metrics.job_canceled("finetune", job.base_model)
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise Conflict(
            f"fine-tune job {job.id} is already {job.status}; only queued or running jobs "
            "can be canceled"
        )
    if was_queued and storage is not None and settings is not None:
        # No worker will run it, so no worker will delete its photos: do it here (or leave
        # them to the sweep when a retention period keeps them).
        retention.after_finetune_end(session, storage, settings, tenant.id, job.id)
        session.refresh(job)
    return job
