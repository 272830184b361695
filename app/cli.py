"""Operator CLI: `tuneqdm-admin keys create|revoke|list` and `tuneqdm-admin tenants
rotate-webhook-secret NAME` (also `python -m app.cli`).

The plaintext key is printed once at creation; only its SHA-256 hash is stored.
"""

from __future__ import annotations

import argparse
import sys

from app.db import engine_from_settings, make_sessionmaker, session_scope
from app.errors import NotFound
from app.services import keys, webhook_secrets
from app.settings import get_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneqdm-admin", description=__doc__)
    sub = parser.add_subparsers(dest="group", required=True)
    keys_p = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys_p.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create", help="create a key (and the tenant if it is new)")
    create.add_argument("--tenant", required=True, help="tenant name, e.g. 'acme'")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id (key_...)")
    revoke.add_argument("key_id")
    keys_sub.add_parser("list", help="list keys (ids, tenants, hints; never the keys)")
    tenants_p = sub.add_parser("tenants", help="manage tenants")
    tenants_sub = tenants_p.add_subparsers(dest="action", required=True)
    rotate = tenants_sub.add_parser(
        "rotate-webhook-secret",
        help="new webhook signing secret; the old one also signs until the overlap "
        "(TUNEQDM_WEBHOOK_SECRET_OVERLAP_S) has passed",
    )
    rotate.add_argument("name", help="tenant name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    factory = make_sessionmaker(engine_from_settings(settings))
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
