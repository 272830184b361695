"""`tuneqdm-admin keys create|list|revoke` against the test database, checked through the API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import cli
from app.models import Tenant
from app.settings import get_settings

ROOT = Path(__file__).resolve().parents[2]


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
    assert client.get("/v1/adapters", headers=headers).status_code == 401
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
