"""Operator CLI (also `python -m app.cli`):

    tuneqdm-admin keys create|revoke|list
    tuneqdm-admin tenants list
    tuneqdm-admin tenants limits NAME [--rpm N] [--active-jobs N] [--stored-bytes N]
    tuneqdm-admin tenants purge NAME --yes
    tuneqdm-admin tenants rotate-webhook-secret NAME
    tuneqdm-admin sweep
    tuneqdm-admin storage init
    tuneqdm-admin bases list
    tuneqdm-admin bases retire NAME

The plaintext key is printed once at creation; only its SHA-256 hash is stored.
"""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import engine_from_settings, make_sessionmaker, session_scope
from app.errors import DomainError, NotFound
from app.logs import audit, configure_logging
from app.models import Tenant
from app.services import bases, keys, quotas, retention, webhook_secrets
from app.settings import Settings, get_settings
from app.storage import storage_from_settings


def _parser() -> argparse.ArgumentParser:
    # Raw: the docstring's examples stay one per line.
    parser = argparse.ArgumentParser(
        prog="tuneqdm-admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="group", required=True)
    keys_p = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_p.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the tenant if it is new)")
    create.add_argument("--tenant", required=True, help="tenant name, e.g. 'acme'")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (key_...)")
    revoke.add_argument("key_id")
    keys_sub.add_parser("list", help="list keys (ids, tenants, hints; never the keys)")

    tenants_p = sub.add_parser("tenants", help="tenants: limits, usage, purge")
    tenants_sub = tenants_p.add_subparsers(dest="action", required=True)
    tenants_sub.add_parser("list", help="tenants with their limits, active jobs and bytes")
    limits = tenants_sub.add_parser(
        "limits",
        help="show or override a tenant's limits ('default': back to the TUNEQDM_TENANT_* "
        "setting; 0: unlimited)",
    )
    limits.add_argument("name")
    for flag in ("--rpm", "--active-jobs", "--stored-bytes"):
        limits.add_argument(flag, type=_limit_value, metavar="N|default")
    purge = tenants_sub.add_parser(
        "purge", help="delete everything of a tenant: keys, jobs, photos, adapters, images"
    )
    purge.add_argument("name")
    purge.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
    sub.add_parser("sweep", help="run the retention sweep once (photos, expired generations)")
    storage_p = sub.add_parser("storage", help="the file store (TUNEQDM_STORAGE_BACKEND)")
    storage_sub = storage_p.add_subparsers(dest="action", required=True)
    storage_sub.add_parser("init", help="create the bucket or folder if missing (idempotent)")
    bases_p = sub.add_parser("bases", help="the bases workers have registered")
    bases_sub = bases_p.add_subparsers(dest="action", required=True)
    bases_sub.add_parser("list", help="bases with their workers and queued jobs")
    retire = bases_sub.add_parser(
        "retire", help="take a base whose workers are stopped and whose jobs ended off the list"
    )
    retire.add_argument("name")
    rotate = tenants_sub.add_parser(
        "rotate-webhook-secret",
        help="new webhook signing secret; the old one also signs until the overlap "
        "(TUNEQDM_WEBHOOK_SECRET_OVERLAP_S) has passed",
    )
    rotate.add_argument("name", help="tenant name")
    return parser


_DEFAULT = -1  # "--rpm default": back to the setting


def _limit_value(text: str) -> int:
    if text == "default":
        return _DEFAULT
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'default', got {text!r}")
    return int(text)


def _tenant(session: Session, name: str) -> Tenant | None:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        print(
            f"error: no tenant named {name!r} (see `tuneqdm-admin tenants list`)", file=sys.stderr
        )
    return tenant


def _show_limits(session: Session, tenant: Tenant, settings: Settings) -> None:
    limits = quotas.limits_of(tenant, settings)

    def label(value: int, override: int | None) -> str:
        shown = "unlimited" if value == 0 else str(value)
        return f"{shown} ({'override' if override is not None else 'setting'})"

    print(f"tenant:        {tenant.name} ({tenant.id})")
    print(f"rpm:           {label(limits.rpm, tenant.rpm_limit)}")
    active = quotas.active_jobs(session, tenant.id)
    print(f"active jobs:   {active} of {label(limits.active_jobs, tenant.active_jobs_limit)}")
    used = quotas.stored_bytes(session, tenant.id)
    print(f"stored bytes:  {used} of {label(limits.stored_bytes, tenant.stored_bytes_limit)}")


def _tenants(args: argparse.Namespace, session: Session, settings: Settings) -> int:
    if args.action == "list":
        for row in session.scalars(select(Tenant).order_by(Tenant.name)):
            _show_limits(session, row, settings)
        return 0
    tenant = _tenant(session, args.name)
    if tenant is None:
        return 1
    if args.action == "limits":
        changes = {
            column: None if value == _DEFAULT else value
            for column, value in (
                ("rpm_limit", args.rpm),
                ("active_jobs_limit", args.active_jobs),
                ("stored_bytes_limit", args.stored_bytes),
            )
            if value is not None
        }
        for column, value in changes.items():
            setattr(tenant, column, value)
        if changes:
            session.flush()
            audit("tenant.limits", tenant_id=tenant.id, **changes)
        _show_limits(session, tenant, settings)
        return 0
    if not args.yes:
        print(
            f"error: purging deletes every key, job, photo, adapter and image of "
            f"{tenant.name!r}; repeat with --yes to confirm",
            file=sys.stderr,
        )
        return 2
    retention.purge_tenant(session=session, storage=storage_from_settings(settings), tenant=tenant)
    print(f"purged tenant {tenant.name} ({tenant.id}): rows and files deleted")
    return 0


def _bases(args: argparse.Namespace, session: Session, settings: Settings) -> int:
    if args.action == "retire":
        try:
            row = bases.retire_base(session=session, settings=settings, name=args.name)
        except DomainError as exc:
            print(f"error: {exc.detail}", file=sys.stderr)
            return 1
        audit("base.retired", base=row.name)
        print(f"retired base {row.name}: requests naming it are refused; its adapters stay")
        return 0
    queued = bases.queued_jobs(session=session)
    since = bases.up_since(session, settings)
    for row in bases.list_bases(session=session):
        up = sum(w.last_seen_at >= since for w in row.workers)
        waiting = queued.get(row.name, {"finetune": 0, "generation": 0})
        default = "  (default)" if row.name == settings.base_model else ""
        print(
            f"{row.name}  {row.bits}-bit  {row.native_resolution} px  workers up {up} of "
            f"{len(row.workers)}  queued {waiting['finetune']} fine-tune(s), "
            f"{waiting['generation']} generation(s){default}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    configure_logging(json_lines=settings.log_json, level=settings.log_level)
    if args.group == "storage":
        print(storage_from_settings(settings).init())
        return 0
    factory = make_sessionmaker(engine_from_settings(settings))
    if args.group == "sweep":
        done = retention.sweep(
            sessions=factory, storage=storage_from_settings(settings), settings=settings
        )
        print(f"photos of {done.photos} fine-tune(s), {done.generations} generation(s) deleted")
        return 0
    with session_scope(factory) as session:
        if args.group == "tenants" and args.action == "rotate-webhook-secret":
            try:
                tenant, secret = webhook_secrets.rotate_secret(
                    session=session, settings=settings, name=args.name
                )
            except NotFound as exc:
                print(f"error: {exc.detail}", file=sys.stderr)
                return 1
            hours = settings.webhook_secret_overlap_s / 3600
            print(f"tenant:  {tenant.name} ({tenant.id})")
            print(f"webhook signing secret: {secret}")
            print(f"Webhooks are signed with the old and the new secret for {hours:g} h.")
        elif args.group == "tenants":
            return _tenants(args, session, settings)
        elif args.group == "bases":
            return _bases(args, session, settings)
        elif args.action == "create":
            name = args.tenant.strip()
            if not name or len(name) > 100:
                print("error: --tenant must be 1-100 characters", file=sys.stderr)
                return 2
            tenant = keys.get_or_create_tenant(session=session, name=name)
            row, plaintext = keys.create_key(session=session, tenant=tenant)
            print(f"key id:  {row.id}")
            print(f"tenant:  {tenant.name} ({tenant.id})")
            print(f"api key: {plaintext}")
            secret = webhook_secrets.current_secret(settings, tenant)
            print(f"webhook signing secret: {secret}")
            print("Store the API key now: it is not saved and cannot be shown again.")
        elif args.action == "revoke":
            try:
                row = keys.revoke_key(session=session, key_id=args.key_id)
            except NotFound as exc:
                print(f"error: {exc.detail}", file=sys.stderr)
                return 1
            print(f"revoked {row.id} (tenant {row.tenant.name})")
        else:
            for row in keys.list_keys(session=session):
                state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                print(f"{row.id}  {row.tenant.name:<20}  {row.key_hint}…  {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
