"""`tuneqdm-admin keys create|list|revoke`, `bases list|retire` against the test database,
checked through the API or the registry."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app import cli
from app.bases import BaseInfo, register
from app.models import BaseWorker, FinetuneJob, ServedBase, Tenant, utcnow
from app.settings import get_settings
from tests.api.factories import make_finetune, make_tenant

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "tuneqdm/fashion-sd"  # TUNEQDM_BASE_MODEL's default


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TUNEQDM_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_create_list_revoke(
    cli_env: None, client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "create", "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"api key: (\S+)", out).group(1)  # type: ignore[union-attr]
    key_id = re.search(r"key id:  (\S+)", out).group(1)  # type: ignore[union-attr]
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/adapters", headers=headers).status_code == 200

    assert cli.main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key_id in listing and "acme" in listing and "active" in listing
    assert key not in listing  # the key itself is never shown again

    # A second key for the same tenant sees the same objects.
    assert cli.main(["keys", "create", "--tenant", "acme"]) == 0
    capsys.readouterr()

    assert cli.main(["keys", "revoke", key_id]) == 0
    assert "revoked" in capsys.readouterr().out
    revoked = client.get("/v1/adapters", headers=headers)
    assert revoked.status_code == 401
    # It names no command to run: the caller may have no shell there, and `make` puts the
    # admin command in .venv/bin, not on PATH.
    assert "tuneqdm-admin" not in revoked.json()["detail"]
    assert "make run" in revoked.json()["detail"]
    assert cli.main(["keys", "revoke", "key_nope"]) == 1
    assert "no API key" in capsys.readouterr().err


def test_module_entry_point(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQDM_")}
    env |= {"TUNEQDM_DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_rotate_webhook_secret(
    cli_env: None, session: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["keys", "create", "--tenant", "acme"]) == 0
    old = re.search(r"webhook signing secret: (\S+)", capsys.readouterr().out).group(1)  # type: ignore[union-attr]
    assert old.startswith("whsec_")
    assert cli.main(["tenants", "rotate-webhook-secret", "acme"]) == 0
    out = capsys.readouterr().out
    new = re.search(r"webhook signing secret: (\S+)", out).group(1)  # type: ignore[union-attr]
    assert new.startswith("whsec_") and new != old and "old and the new" in out
    tenant = session.scalars(select(Tenant).where(Tenant.name == "acme")).one()
    assert tenant.webhook_secret_version == 1 and tenant.webhook_secret_rotated_at is not None
    # A new key for the tenant prints the current secret.
    assert cli.main(["keys", "create", "--tenant", "acme"]) == 0
    assert f"webhook signing secret: {new}" in capsys.readouterr().out
    assert cli.main(["tenants", "rotate-webhook-secret", "nobody"]) == 1
    assert "no tenant named 'nobody'" in capsys.readouterr().err


def test_bases_list_and_retire(
    cli_env: None, session: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    other = "sd21-8bit"
    register(
        session,
        BaseInfo(other, "/models/sd21", 64, "epsilon", 8),
        worker="gpu-2:7",
        storage_mode="packed",
    )
    register(session, BaseInfo(DEFAULT_BASE, "/m", 32, "epsilon", 4), worker="gpu-1:5")
    session.commit()
    t = make_tenant(session)
    job = make_finetune(session, t.tenant, status="queued", base_model=other)

    assert cli.main(["bases", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{other}  8-bit  64 px  workers up 1 of 1  queued 1 fine-tune(s)" in out
    assert f"{DEFAULT_BASE}  4-bit" in out and "(default)" in out

    def refused(name: str, reason: str) -> None:
        assert cli.main(["bases", "retire", name]) == 1
        assert reason in capsys.readouterr().err
        session.expire_all()
        assert session.get(ServedBase, name) is not None or name == "nope"

    refused(other, "workers still serve 'sd21-8bit' (gpu-2:7); stop them first")
    long_ago = utcnow() - timedelta(hours=1)
    session.execute(update(BaseWorker).values(last_seen_at=long_ago))
    session.commit()
    refused(other, "1 fine-tunes of 'sd21-8bit' are queued or running")
    job.status = "canceled"
    session.commit()
    refused(DEFAULT_BASE, "is the default base")
    refused("nope", "no base named 'nope'")

    assert cli.main(["bases", "retire", other]) == 0
    assert "retired base sd21-8bit" in capsys.readouterr().out
    session.expire_all()
    assert session.get(ServedBase, other) is None
    assert session.get(FinetuneJob, job.id) is not None  # jobs and adapters stay


def test_help_keeps_its_examples_one_per_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "    tuneqdm-admin keys create|revoke|list" in lines
    assert "    tuneqdm-admin bases retire NAME" in lines
