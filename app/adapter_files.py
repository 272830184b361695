"""What an uploaded adapter file says about itself, read without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's
dtype, shape and byte range, plus ``__metadata__``: text keys and values), then the tensor
bytes. The API only needs the header: the ``tuneqdm`` metadata entry that
``tuneqdm_core.serialization.save_adapter`` writes (format version, method, bits, intervals,
base fingerprint, layers, extra) and the tensor names and byte ranges, which must agree with it.
The tensor values are read by the worker that loads the adapter, which checks the layers
against its model again.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, BinaryIO

from app.errors import InvalidInput
from app.models import METHODS

# The adapter format these checks read (tuneqdm_core.serialization.FORMAT_VERSION) and its
# metadata key; the app may not import tuneqdm_core (it imports torch), so they are restated
# here and tests/api/test_adapter_upload.py checks that the two agree.
FORMAT_VERSION = 1
METADATA_KEY = "tuneqdm"
# An adapter's header names two tensors per layer and interval; a few MiB is far more than a
# real one needs, and bounds what a hostile file makes the API parse.
MAX_HEADER_BYTES = 16 * 1024 * 1024
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class AdapterHeader:
    method: str
    bits: int
    intervals: int
    base_fingerprint: str
    tokens: list[str]


def _show(value: object) -> str:
    """A value read from the file, cut short: a hostile header must not fill the error."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(detail: str) -> InvalidInput:
    return InvalidInput(f"file: {detail}", field="file")


def _header(f: BinaryIO, size: int) -> dict[str, Any]:
    raw = f.read(8)
    if len(raw) < 8:
        raise _bad("not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise _bad("not a safetensors file (its header length is past the end of the file)")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad("not a safetensors file (its header is not a JSON object)")
    _check_tensors(header, size - 8 - length)
    return header


def _check_tensors(header: dict[str, Any], data_bytes: int) -> None:
    """Every tensor a float of the size its shape says, inside the file, none overlapping."""
    end = 0
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
            ok = (
                dtype in _DTYPE_BYTES
                and 0 <= start <= stop
                and stop - start == count * (_DTYPE_BYTES[dtype])
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _bad(
                f"tensor {_show(name)} has a malformed entry; adapters hold float scales only"
            )
        spans.append((start, stop))
        end = max(end, stop)
    spans.sort()
    if any(a[1] > b[0] for a, b in pairwise(spans)) or end != data_bytes:
        raise _bad("tensor byte ranges do not match the file (truncated or padded)")


def read_header(f: BinaryIO, size: int) -> AdapterHeader:
    """The facts of the adapter file `f` (`size` bytes), or InvalidInput saying what is wrong."""
    header = _header(f, size)
    meta = header.get("__metadata__") or {}
    raw = meta.get(METADATA_KEY) if isinstance(meta, dict) else None
    if not isinstance(raw, str):
        raise _bad(
            f"no {METADATA_KEY!r} metadata; upload a file written by `tuneqdm finetune` "
            "(or tuneqdm_core.save_adapter)"
        )
    try:
        info = json.loads(raw)
        version = info["format_version"]
        method, bits, intervals = info["method"], info["bits"], info["intervals"]
        fingerprint, layers = info["base_fingerprint"], info["layers"]
        extra = info.get("extra") or {}
    except (json.JSONDecodeError, KeyError, TypeError):
        raise _bad(f"malformed {METADATA_KEY!r} metadata") from None
    if version != FORMAT_VERSION:
        raise _bad(f"adapter format version {_show(version)}; this service reads {FORMAT_VERSION}")
    if method not in METHODS or method == "full":
        raise _bad(f"method {_show(method)}; an adapter file holds tuneqdm or peqa scales")
    if bits not in (4, 8):
        raise _bad(f"bits {_show(bits)}; send an adapter of a 4- or 8-bit base")
    if not isinstance(intervals, int) or not 1 <= intervals <= 8:
        raise _bad(f"intervals {_show(intervals)}; 1 to 8 are served")
    if method != "tuneqdm" and intervals != 1:
        raise _bad(f"method {method} trains one scale set, but the file says {intervals} intervals")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise _bad("no base fingerprint in the metadata")
    _check_layers(header, layers, intervals)
    tokens = extra.get("tokens") if isinstance(extra, dict) else None
    return AdapterHeader(
        method=method,
        bits=bits,
        intervals=intervals,
        base_fingerprint=fingerprint,
        tokens=[t for t in tokens if isinstance(t, str)] if isinstance(tokens, list) else [],
    )


def _check_layers(header: dict[str, Any], layers: Any, intervals: int) -> None:
    """The tensors are exactly each listed layer's s_out (and, where present, s_in) for every
    interval: an adapter claiming 2 intervals with scales for 1 is refused here, not when a
    generation loads it."""
    names = {n for n in header if n != "__metadata__"}
    if not isinstance(layers, list) or not layers:
        raise _bad("no layers in the metadata")
    try:
        layer_names = [str(layer[0]) for layer in layers]
    except (TypeError, IndexError, KeyError):
        raise _bad("malformed layers in the metadata") from None
    expected_out = {f"{n}.s_out.{k}" for n in layer_names for k in range(intervals)}
    missing = sorted(expected_out - names)
    allowed = expected_out | {f"{n}.s_in.{k}" for n in layer_names for k in range(intervals)}
    extra = sorted(names - allowed)
    if missing or extra:
        shown = ", ".join(_show(n) for n in (missing + extra)[:3])
        raise _bad(
            f"tensors do not match {intervals} interval(s) of the listed layers "
            f"({len(missing)} missing, {len(extra)} unexpected, e.g. {shown})"
        )
