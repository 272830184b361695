"""Photos sent as one .zip archive (`images_zip`), unpacked with limits before anything is stored.

A zip can claim any size and expand a thousandfold (a "zip bomb"), hold names like
`../../etc/passwd`, or be a folder of everything on a phone. Every entry is read with a byte
cap whatever its header says; the archive as a whole is bounded by the same limits as photos
sent one by one (TUNEQDM_MAX_IMAGES, TUNEQDM_MAX_IMAGE_BYTES each); and an entry that is
neither a photo nor a folder is refused by name rather than skipped, so a user learns that a
file was left out. Nothing is written to the store here: the entries go through the same
checks as uploaded photos (app.services.finetunes.check_upload).
"""

from __future__ import annotations

import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, cast

from app.errors import InvalidInput, PayloadTooLarge

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# An image file compresses little (PNG/JPEG/WebP are compressed already); 100:1 is far above
# any photo and far below a bomb's ratio.
MAX_RATIO = 100
# Entries looked at, photos and skipped ones together: a bound on the work for one archive.
MAX_ENTRIES_FACTOR = 4
# Kept in memory up to this size, then spooled to a temporary file.
_SPOOL_BYTES = 1024 * 1024


@dataclass
class Entry:
    name: str  # as shown in messages: quoted and shortened
    stream: BinaryIO


def shown(name: str) -> str:
    """An entry's name for a message: printable, quoted, at most 80 characters."""
    clean = "".join(c if c.isprintable() else "?" for c in name)
    return repr(clean if len(clean) <= 80 else clean[:77] + "...")


def _skipped(path: PurePosixPath, info: zipfile.ZipInfo) -> bool:
    # Folders, and what zip tools add on their own (macOS resource forks, Finder files).
    return info.is_dir() or path.parts[0] == "__MACOSX" or path.name.startswith(".")


def _check_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if (
        "\\" in name
        or "\x00" in name
        or path.is_absolute()
        or ".." in path.parts
        or (path.parts and path.parts[0].endswith(":"))
        or not path.parts
    ):
        raise InvalidInput(
            f"images_zip: entry {shown(name)} has an absolute or parent-relative path; "
            "zip the photos with plain relative names",
            field="images_zip",
        )
    return path


def unpack(
    archive: BinaryIO, *, max_images: int, max_image_bytes: int, already: int = 0
) -> list[Entry]:
    """The photos of `archive`, in name order; InvalidInput or PayloadTooLarge naming the
    entry at fault. `already` photos were sent as files beside it (they count too)."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise InvalidInput(
            "images_zip is not a readable .zip archive", field="images_zip"
        ) from None
    entries: list[Entry] = []
    try:
        infos = zf.infolist()
        if len(infos) > MAX_ENTRIES_FACTOR * max_images:
            raise InvalidInput(
                f"images_zip holds {len(infos)} entries, more than "
                f"{MAX_ENTRIES_FACTOR * max_images} are not looked at; zip only the photos",
                field="images_zip",
            )
        photos = []
        for info in sorted(infos, key=lambda i: i.filename):
            path = _check_name(info.filename)
            if _skipped(path, info):
                continue
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise InvalidInput(
                    f"images_zip: entry {shown(info.filename)} is not a photo "
                    f"({', '.join(IMAGE_SUFFIXES)}); remove it from the archive",
                    field="images_zip",
                )
            photos.append(info)
        if already + len(photos) > max_images:
            raise InvalidInput(
                f"{already + len(photos)} images sent (images_zip holds {len(photos)}), the "
                f"limit is {max_images}; send fewer",
                field="images_zip",
            )
        for info in photos:
            entries.append(Entry(shown(info.filename), _read(zf, info, max_image_bytes)))
    except BaseException:
        for e in entries:
            e.stream.close()
        raise
    finally:
        zf.close()
    return entries


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> BinaryIO:
    name = shown(info.filename)
    if info.flag_bits & 0x1:
        raise InvalidInput(
            f"images_zip: entry {name} is encrypted; zip the photos without a password",
            field="images_zip",
        )
    if info.file_size > limit:
        raise PayloadTooLarge(
            f"images_zip: entry {name} is {info.file_size} bytes, the limit per photo is {limit}"
        )
    if info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise InvalidInput(
            f"images_zip: entry {name} expands {info.file_size // max(info.compress_size, 1)}"
            f"-fold, above {MAX_RATIO}:1; photos do not compress like that",
            field="images_zip",
        )
    out = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - returned open
    try:
        # The header's sizes are the sender's word: count what actually comes out.
        read = 0
        with zf.open(info) as src:
            while chunk := src.read(64 * 1024):
                read += len(chunk)
                if read > limit or read > MAX_RATIO * max(info.compress_size, 1):
                    raise PayloadTooLarge(
                        f"images_zip: entry {name} expands beyond its declared size or the "
                        f"limit of {limit} bytes per photo"
                    )
                out.write(chunk)
        out.seek(0)
        return cast(BinaryIO, out)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError):
        out.close()
        raise InvalidInput(
            f"images_zip: entry {name} is damaged or uses an unsupported compression",
            field="images_zip",
        ) from None
    except BaseException:
        out.close()
        raise
