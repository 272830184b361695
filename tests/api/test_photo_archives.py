"""Photos as one .zip (`images_zip`): unpacked with limits; a bad archive is a 4xx that names
the entry at fault, with nothing stored."""

from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import FinetuneJob
from app.storage import LocalStorage
from tests.api.factories import image_bytes, make_tenant, snapshot
from tests.api.test_bad_input import assert_problem

PNG = image_bytes(64, 64)


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in entries:
            if name.endswith("/"):
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return buf.getvalue()


def _post(client: TestClient, headers: dict[str, str], archive: bytes, *, files: int = 0):  # type: ignore[no-untyped-def]
    parts = [("images", (f"{i}.png", PNG, "image/png")) for i in range(files)]
    parts.append(("images_zip", ("photos.zip", archive, "application/zip")))
    return client.post(
        "/v1/finetunes",
        headers=headers,
        files=parts,
        data={"instance_prompt": "a photo of sks dog"},
    )


def test_a_zip_of_photos_makes_a_job(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    archive = _zip(
        [
            ("photos/", b""),
            ("photos/a.png", PNG),
            ("photos/b.JPG", image_bytes(64, 64, "JPEG")),
            ("__MACOSX/photos/._a.png", b"\x00\x05\x16\x07"),  # what macOS zips add
            ("photos/.DS_Store", b"junk"),
        ]
    )
    r = _post(client, t.headers, archive, files=1)
    assert r.status_code == 202, r.text
    job = session.get(FinetuneJob, r.json()["id"])
    assert job is not None and job.num_images == 3 and len(job.images) == 3


def _bomb() -> bytes:
    # 9 MB of zeros deflate to ~9 kB: a ratio near 1000:1.
    return _zip([("a.png", PNG), ("b.png", b"\x00" * 9_000_000)])


def _lying_size() -> bytes:
    # The header says 100 bytes; the data inflates to 5 MB.
    archive = bytearray(_zip([("a.png", b"\x00" * 5_000_000)]))
    raw = bytes(archive)
    header = raw.index(b"PK\x03\x04")
    central = raw.index(b"PK\x01\x02")
    archive[header + 22 : header + 26] = (100).to_bytes(4, "little")
    archive[central + 24 : central + 28] = (100).to_bytes(4, "little")
    return bytes(archive)


CASES = [
    ("not a zip", b"this is not an archive", 422, "not a readable .zip archive"),
    (
        "a text file",
        _zip([("a.png", PNG), ("notes.txt", b"hi")]),
        422,
        "'notes.txt' is not a photo",
    ),
    ("parent path", _zip([("../../evil.png", PNG)]), 422, "'../../evil.png' has an absolute"),
    ("absolute path", _zip([("/etc/a.png", PNG)]), 422, "'/etc/a.png' has an absolute"),
    ("too many photos", _zip([(f"{i}.png", PNG) for i in range(5)]), 422, "the limit is 4"),
    ("too many entries", _zip([(f"d{i}/", b"") for i in range(17)]), 422, "holds 17 entries"),
    ("a zip bomb", _bomb(), 413, "'b.png' is 9000000 bytes"),
    # zipfile stops at the declared size; the checksum then fails.
    ("a lying header", _lying_size(), 422, "'a.png' is damaged"),
    ("a high ratio", _zip([("a.png", b"\x00" * 200_000)]), 422, "above 100:1"),
    ("empty", _zip([]), 422, "at least 1 photo"),
    ("a broken photo", _zip([("a.png", PNG[:40])]), 422, "images_zip entry 'a.png'"),
]


@pytest.mark.parametrize(
    ("archive", "status", "expect"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_archives_are_refused_by_entry(
    client: TestClient,
    session: Session,
    storage: LocalStorage,
    archive: bytes,
    status: int,
    expect: str,
) -> None:
    t = make_tenant(session)
    before = snapshot(session, storage)
    r = _post(client, t.headers, archive)
    assert r.status_code == status, r.text
    assert_problem(r, status)
    assert expect in r.json()["detail"], r.json()
    assert snapshot(session, storage) == before


def test_photos_and_zip_count_together(client: TestClient, session: Session) -> None:
    t = make_tenant(session)
    r = _post(client, t.headers, _zip([("a.png", PNG), ("b.png", PNG)]), files=3)
    assert r.status_code == 422 and "5 images sent" in r.json()["detail"]
    assert r.json()["errors"] == [{"field": "images_zip", "message": r.json()["detail"]}]
