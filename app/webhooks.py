"""Webhook URL checks made when a job is submitted, and the signature every webhook carries.

Only literal addresses and well-known local names are checked here, without DNS: a lookup at
request time would slow every submission and still not stop DNS rebinding. Whoever sends the
webhook (the worker) must resolve the host and apply `is_forbidden_address` again at send time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

from app.errors import InvalidInput

_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain")


def is_forbidden_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global is False for loopback, private, link-local, shared (CGNAT), reserved, etc.
    return not ip.is_global or ip.is_multicast


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # inet_aton accepts the short/decimal/hex forms ("127.1", "2130706433", "0x7f.0.0.1") that
    # HTTP clients also resolve to IPv4 addresses without DNS.
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def check_webhook_url(url: str, *, allow_private: bool) -> str:
    if len(url) > 2048:
        raise InvalidInput("webhook_url is longer than 2048 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise InvalidInput("webhook_url contains spaces or control characters; URL-encode them")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise InvalidInput(f"webhook_url {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput("webhook_url must start with http:// or https://")
    if not host:
        raise InvalidInput("webhook_url has no host name")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("webhook_url must not contain credentials (user:password@)")
    if allow_private:
        return url
    host = host.rstrip(".").lower()
    ip = _literal_ip(host)
    if (ip is not None and is_forbidden_address(ip)) or (
        host == "localhost" or host.endswith(_LOCAL_SUFFIXES)
    ):
        raise InvalidInput(
            f"webhook_url points at a loopback, private or link-local address ({host}); use a "
            "public host (an operator can allow private hosts with "
            "TUNEQDM_ALLOW_PRIVATE_WEBHOOKS=true)"
        )
    return url


# Signature header: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`. The
# timestamp is signed too, so a receiver can refuse replays older than a few minutes.
SIGNATURE_HEADER = "X-TuneQDM-Signature"


def tenant_webhook_secret(secret_key: str, tenant_id: str) -> str:
    """Each tenant's signing secret, derived from the server's key (nothing extra to store)."""
    return hmac.new(
        secret_key.encode(), f"webhook:{tenant_id}".encode(), hashlib.sha256
    ).hexdigest()


def sign_webhook(secret: str, body: bytes, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify_webhook(
    secret: str, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """What a receiver does: recompute the MAC and compare in constant time."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        t = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign_webhook(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))
