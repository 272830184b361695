"""The webhook SSRF filter on every IPv6 form that embeds an IPv4 address: each is judged by
the IPv4 address inside, when the URL is submitted (app.webhooks.check_webhook_url) and when
the webhook is sent (worker.webhooks.post_json resolves the host and checks each address)."""

from __future__ import annotations

import ipaddress

import pytest

from app.errors import InvalidInput
from app.webhooks import check_webhook_url, is_forbidden_address
from worker.webhooks import WebhookRefused, post_json

METADATA = ipaddress.IPv4Address("169.254.169.254")  # the cloud metadata service


def _teredo(server: str, client: str) -> str:
    """A Teredo address (RFC 4380): 2001:0::/32, the server's IPv4, flags, and the client's
    port and IPv4 each XOR-ed with all ones."""
    value = (0x20010000 << 96) | (int(ipaddress.IPv4Address(server)) << 64)
    value |= (0xFFFF ^ 40000) << 32
    value |= 0xFFFFFFFF ^ int(ipaddress.IPv4Address(client))
    return str(ipaddress.IPv6Address(value))


def _embed(prefix: str, v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(prefix)) | int(v4)))


FORMS = {
    "mapped ::ffff:0:0/96": _embed("::ffff:0:0", METADATA),
    "SIIT ::ffff:0:0:0/96": "::ffff:0:a9fe:a9fe",
    "compatible ::/96": _embed("::", METADATA),
    "NAT64 64:ff9b::/96": _embed("64:ff9b::", METADATA),
    "local NAT64 64:ff9b:1::/48": _embed("64:ff9b:1::", METADATA),
    "6to4 2002::/16": str(ipaddress.IPv6Address((0x2002 << 112) | (int(METADATA) << 80) | 1)),
    "Teredo 2001::/32, private client": _teredo("65.54.227.120", "169.254.169.254"),
    "Teredo 2001::/32, private server": _teredo("10.0.0.1", "8.8.8.8"),
    "SIIT of loopback": _embed("::ffff:0:0:0", ipaddress.IPv4Address("127.0.0.1")),
    "SIIT of 10/8": _embed("::ffff:0:0:0", ipaddress.IPv4Address("10.1.2.3")),
}


@pytest.mark.parametrize("address", FORMS.values(), ids=FORMS.keys())
def test_an_embedded_private_ipv4_is_refused_at_submit_and_at_send_time(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address))
    url = f"http://[{address}]/hook"
    with pytest.raises(InvalidInput, match="loopback, private or link-local"):
        check_webhook_url(url, allow_private=False, ports=[80, 443])
    with pytest.raises(WebhookRefused, match="non-public"):
        post_json(url, b"{}", {}, timeout=5, allow_private=False, ports=[])


def test_the_teredo_client_address_is_read_through_its_xor() -> None:
    # The literal bytes of the client field are not the client's address: a filter that reads
    # them unmasked sees 86.1.86.1 here, a public address, and lets the metadata service by.
    address = ipaddress.IPv6Address(FORMS["Teredo 2001::/32, private client"])
    assert ipaddress.IPv4Address(int(address) & 0xFFFFFFFF) == ipaddress.IPv4Address("86.1.86.1")
    assert address.teredo is not None and address.teredo[1] == METADATA
