"""Photos named by https URLs (`image_urls`), fetched by the API when a fine-tune is submitted.

A URL says where the API should connect, so the webhook rules apply (app.webhooks,
app.outbound): https only, the ports of TUNEQDM_WEBHOOK_PORTS, and every address the host
resolves to must be public (unless TUNEQDM_ALLOW_PRIVATE_WEBHOOKS), checked when fetching, with
the connection made to exactly the address checked. Redirects are followed by hand, at most
MAX_REDIRECTS of them, and each hop is checked like the first, so a public URL cannot redirect
into a private network. Each photo is read up to TUNEQDM_MAX_IMAGE_BYTES, and all the URLs of
one request share one deadline, TUNEQDM_IMAGE_URL_TIMEOUT_S. What comes back goes through the
same checks as uploaded photos (app.services.finetunes.check_upload); none of it is logged.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urljoin, urlsplit

from app.errors import InvalidInput, PayloadTooLarge
from app.outbound import PinnedHTTPS
from app.webhooks import IPAddress, check_port, is_forbidden_address

MAX_REDIRECTS = 3
MAX_URL_CHARS = 2048
_CHUNK = 64 * 1024
# Lookups run here so that a hanging resolver counts against the deadline.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="image-url-dns")

# Whether an address may be fetched from; None: the public ones only (is_forbidden_address).
AddressCheck = Callable[[IPAddress], bool]


def named(index: int, url: str) -> str:
    """How messages name a URL: its field and the URL, shortened."""
    shown = url if len(url) <= 200 else url[:197] + "..."
    return f"image_urls[{index}] ({shown})"


def check_url(url: str, index: int, *, ports: Collection[int]) -> str:
    """The syntax checks, made before anything is fetched: an https URL without credentials
    on an allowed port. Returns the URL stripped of surrounding blanks."""
    url = url.strip()
    what, field = named(index, url), f"image_urls[{index}]"
    if len(url) > MAX_URL_CHARS:
        raise InvalidInput(f"{field} is longer than {MAX_URL_CHARS} characters", field=field)
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise InvalidInput(
            f"{what} contains spaces or control characters; URL-encode them", field=field
        )
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise InvalidInput(f"{what} is not a valid URL", field=field) from None
    if parts.scheme != "https":
        raise InvalidInput(
            f"{what} is not an https:// URL; photos are fetched over https only", field=field
        )
    if not parts.hostname:
        raise InvalidInput(f"{what} has no host name", field=field)
    if parts.username is not None or parts.password is not None:
        raise InvalidInput(f"{what} must not contain credentials (user:password@)", field=field)
    refused = check_port(port or 443, ports)
    if refused is not None:
        raise InvalidInput(f"{what}: {refused.replace('webhooks', 'URLs')}", field=field)
    return url


class _Deadline:
    """One deadline for every URL of a request; `cut` shuts the current connection when it
    passes, which wakes a read blocked on a server that sends a byte now and then."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.expired = threading.Event()
        self.conn: http.client.HTTPConnection | None = None
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def left(self, what: str) -> float:
        remaining = self.at - time.monotonic()
        if remaining <= 0 or self.expired.is_set():
            raise self.exceeded(what)
        return remaining

    def exceeded(self, what: str) -> InvalidInput:
        return InvalidInput(
            f"{what} could not be fetched within {self.seconds:g} s (the time limit for all "
            "image_urls of a request); use a faster host or upload the photo",
            field=what.split(" ")[0],
        )

    def _cut(self) -> None:
        self.expired.set()
        sock = self.conn.sock if self.conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing to cut
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _resolve(
    host: str, port: int, what: str, field: str, allowed: AddressCheck, deadline: _Deadline
) -> str:
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=deadline.left(what))
    except FutureTimeout:
        raise deadline.exceeded(what) from None
    except socket.gaierror:
        raise InvalidInput(f"{what}: host {host} was not found", field=field) from None
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        if not allowed(ipaddress.ip_address(address.split("%")[0])):
            raise InvalidInput(
                f"{what}: {host} resolves to a loopback, private or link-local address "
                f"({address}); photos are fetched from public hosts only",
                field=field,
            )
    return addresses[0]


def _get(
    url: str,
    what: str,
    field: str,
    *,
    limit: int,
    allowed: AddressCheck,
    deadline: _Deadline,
) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location, body up to `limit` bytes)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    ip = _resolve(host, port, what, field, allowed, deadline)
    conn = PinnedHTTPS(host, port, ip, deadline.left(what))
    deadline.conn = conn
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": "tuneqdm-image-fetch/1"})
        response = conn.getresponse()
        if 300 <= response.status < 400:
            return response.status, response.getheader("Location"), b""
        if response.status != 200:
            return response.status, None, b""
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"{what} is {declared} bytes, above the limit of {limit} bytes per photo"
            )
        body = bytearray()
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(deadline.left(what))
            chunk = response.read(_CHUNK)
            if not chunk:
                break
            body += chunk
            if len(body) > limit:
                raise PayloadTooLarge(
                    f"{what} is larger than the limit of {limit} bytes per photo; "
                    "use a smaller photo"
                )
        return response.status, None, bytes(body)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.expired.is_set() or isinstance(exc, TimeoutError):
            raise deadline.exceeded(what) from None
        raise InvalidInput(
            f"{what} could not be fetched ({type(exc).__name__}: {exc})", field=field
        ) from None
    finally:
        deadline.conn = None
        conn.close()


def fetch(
    url: str,
    index: int,
    *,
    limit: int,
    ports: Collection[int],
    allowed: AddressCheck,
    deadline: _Deadline,
) -> bytes:
    """The body of `url` after at most MAX_REDIRECTS redirects, each hop checked anew."""
    what, field = named(index, url), f"image_urls[{index}]"
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        status, location, body = _get(
            current, what, field, limit=limit, allowed=allowed, deadline=deadline
        )
        if status == 200:
            return body
        if location is None:
            raise InvalidInput(
                f"{what} answered HTTP {status}; give a URL that answers 200 with the photo",
                field=field,
            )
        target = urljoin(current, location)
        try:
            # The same rules for every hop: https, the allowed ports, no credentials.
            current = check_url(target, index, ports=ports)
        except InvalidInput as exc:
            raise InvalidInput(
                f"{what} redirects to a URL that is refused: {exc.detail}", field=field
            ) from None
    raise InvalidInput(
        f"{what} redirects more than {MAX_REDIRECTS} times; give the photo's final URL",
        field=field,
    )


def fetch_all(
    urls: list[str],
    *,
    limit: int,
    timeout_s: float,
    allow_private: bool,
    ports: Collection[int],
    allowed: AddressCheck | None = None,
) -> list[bytes]:
    """Fetch checked `urls` in order, within one deadline of `timeout_s` for all of them.
    `allowed` replaces the address rule (public only, or any with `allow_private`)."""
    if allowed is None:
        allowed = (lambda ip: True) if allow_private else (lambda ip: not is_forbidden_address(ip))
    with _Deadline(timeout_s) as deadline:
        return [
            fetch(url, i, limit=limit, ports=ports, allowed=allowed, deadline=deadline)
            for i, url in enumerate(urls)
        ]
