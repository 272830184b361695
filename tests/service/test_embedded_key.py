"""`make run`'s launcher reuses the key it stored, mints one with --new-key, and mints one again
when the stored key was revoked (before, every start minted another key)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.db import engine_from_settings, make_sessionmaker, session_scope
from app.services import keys
from app.settings import Settings
from worker.embedded import KEY_FILE, prepare


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var", model=str(tiny_model_dir))


def _key_count(settings: Settings) -> int:
    engine = engine_from_settings(settings)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            return len(keys.list_keys(session=session))
    finally:
        engine.dispose()


def test_the_stored_key_is_reused_until_a_new_one_is_asked_for(settings: Settings) -> None:
    first, _ = prepare(settings, "local")
    path = settings.data_dir / KEY_FILE
    assert path.read_text().strip() == first
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # a secret
    again, _ = prepare(settings, "local")
    assert again == first and _key_count(settings) == 1

    fresh, _ = prepare(settings, "local", new_key=True)
    assert fresh != first and _key_count(settings) == 2
    assert prepare(settings, "local")[0] == fresh

    # Revoked (or of another tenant): a new key, stored in its place.
    engine = engine_from_settings(settings)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            for row in keys.list_keys(session=session):
                keys.revoke_key(session=session, key_id=row.id)
    finally:
        engine.dispose()
    after_revoke, _ = prepare(settings, "local")
    assert after_revoke not in (first, fresh)
    other_tenant, _ = prepare(settings, "someone")
    assert other_tenant != after_revoke
