"""Webhook URL checks made when a job is submitted, and the signature every webhook carries.

Only literal addresses and well-known local names are checked here, without DNS: a lookup at
request time would slow every submission and still not stop DNS rebinding. Whoever sends the
webhook (the worker) must resolve the host and apply `is_forbidden_address` again at send time.

Signatures follow Standard Webhooks (https://www.standardwebhooks.com): headers `webhook-id`,
`webhook-timestamp` and `webhook-signature` = space-separated `v1,<base64 HMAC-SHA256 of
"<id>.<timestamp>.<body>">`, one per valid secret of the tenant (old and new after a rotation).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Collection
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from app.errors import InvalidInput

_LOCAL_SUFFIXES = (".localhost", ".local", ".internal", ".localdomain")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 forms that carry an IPv4 address a router or relay may forward to (RFC 4291 mapped
# and compatible, RFC 2765 SIIT "IPv4-translated" ::ffff:0:a.b.c.d, RFC 6052 NAT64, RFC 3056
# 6to4, RFC 4380 Teredo); each is checked by its IPv4 part.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
# RFC 8215 local-use NAT64: translates into whatever IPv4 network the operator chose.
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip in _NAT64 or ip in _IPV4_COMPATIBLE or ip in _SIIT:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # (server, client); Python undoes the client's XOR
    return []


def is_forbidden_address(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # Deprecated ranges that Python still calls global: site-local (RFC 3879), local-use
        # NAT64 and the IPv4-compatible block (RFC 4291 deprecates it; nothing routes it).
        if ip.is_site_local or ip in _NAT64_LOCAL or ip in _IPV4_COMPATIBLE:
            return True
        if any(is_forbidden_address(v4) for v4 in _embedded_ipv4(ip)):
            return True
    # is_global is False for loopback, private, link-local, shared (CGNAT), reserved, etc.
    return not ip.is_global or ip.is_multicast


def _literal_ip(host: str) -> IPAddress | None:
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


def check_port(port: int, ports: Collection[int]) -> str | None:
    """Why `port` may not receive webhooks (None: it may). `ports` empty allows any port."""
    if ports and port not in ports:
        allowed = ", ".join(str(p) for p in sorted(ports))
        return (
            f"port {port} is not allowed for webhooks (allowed: {allowed}); use a standard "
            "port, or an operator can allow more with TUNEQDM_WEBHOOK_PORTS"
        )
    return None


def check_webhook_url(url: str, *, allow_private: bool, ports: Collection[int]) -> str:
    if len(url) > 2048:
        raise InvalidInput("webhook_url is longer than 2048 characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise InvalidInput("webhook_url contains spaces or control characters; URL-encode them")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise InvalidInput(f"webhook_url {url!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput("webhook_url must start with http:// or https://")
    if not host:
        raise InvalidInput("webhook_url has no host name")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("webhook_url must not contain credentials (user:password@)")
    host = host.rstrip(".").lower()
    ip = _literal_ip(host)
    if not allow_private and (
        (ip is not None and is_forbidden_address(ip))
        or host == "localhost"
        or host.endswith(_LOCAL_SUFFIXES)
    ):
        raise InvalidInput(
            f"webhook_url points at a loopback, private or link-local address ({host}); use a "
            "public host (an operator can allow private hosts with "
            "TUNEQDM_ALLOW_PRIVATE_WEBHOOKS=true)"
        )
    refused = check_port(port or (443 if parts.scheme == "https" else 80), ports)
    if refused is not None:
        raise InvalidInput(f"webhook_url: {refused}")
    return url


SECRET_PREFIX = "whsec_"


def tenant_webhook_secret(secret_key: str, tenant_id: str, version: int = 0) -> str:
    """A tenant's signing secret, `whsec_<base64 of 32 bytes>`, derived from the server's key,
    the tenant id and the secret's version (nothing secret is stored in the database)."""
    message = f"webhook:{tenant_id}:v{version}".encode()
    key = hmac.new(secret_key.encode(), message, hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(key).decode()


def signing_secrets(
    secret_key: str,
    tenant_id: str,
    *,
    version: int,
    rotated_at: datetime | None,
    overlap_s: float,
    now: datetime,
) -> list[str]:
    """The secrets a webhook sent at `now` is signed with: the current one, plus the previous
    one while the rotation's overlap lasts."""
    found = [tenant_webhook_secret(secret_key, tenant_id, version)]
    if version > 0 and rotated_at is not None and now < rotated_at + timedelta(seconds=overlap_s):
        found.append(tenant_webhook_secret(secret_key, tenant_id, version - 1))
    return found


def _key_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(
        _key_bytes(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256
    ).digest()
    return "v1," + base64.b64encode(mac).decode()


def webhook_headers(secrets: list[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, msg_id, timestamp, body) for s in secrets),
    }


def verify_webhook(
    secret: str, headers: dict[str, str], body: bytes, *, now: float, tolerance_s: float = 300
) -> bool:
    """What a receiver does: recompute the MAC, compare each v1 signature in constant time,
    and refuse timestamps more than `tolerance_s` away (replays)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    try:
        msg_id = lowered["webhook-id"]
        timestamp = int(lowered["webhook-timestamp"])
        signatures = lowered["webhook-signature"].split(" ")
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = signature(secret, msg_id, timestamp, body)
    return any(hmac.compare_digest(expected, s) for s in signatures)
