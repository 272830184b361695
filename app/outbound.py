"""Outbound connections to addresses a user named (webhooks, photo URLs): resolve the host,
refuse it if any address it resolves to is not public, and connect to exactly the address that
was checked, so a second lookup cannot be raced by DNS rebinding. Shared by app and worker: no
FastAPI. The address rules themselves are app.webhooks.is_forbidden_address.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl

from app.webhooks import is_forbidden_address


def first_forbidden(addresses: list[str]) -> str | None:
    """The first of `addresses` (as getaddrinfo gives them) that is not public, else None."""
    for address in addresses:
        # A scoped IPv6 address ("fe80::1%eth0") is checked without its zone.
        if is_forbidden_address(ipaddress.ip_address(address.split("%")[0])):
            return address
    return None


class PinnedHTTP(http.client.HTTPConnection):
    """HTTP to `ip`, with `host` in the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to `ip`; the certificate and SNI are checked against `host`."""

    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        self.sock = sock  # visible to a deadline's watchdog during the TLS handshake
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
