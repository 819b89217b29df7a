"""Listeners → socket names, with a fake interface table: pure, no sockets."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence

import pytest

from udpbindd.config import Listener, parse_text
from udpbindd.expand import Binding, expand, expand_all
from udpbindd.names import IPAddress

INTERFACES: Mapping[str, Sequence[IPAddress]] = {
    "lo": (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")),
    "eth0": (
        ipaddress.ip_address("192.0.2.2"),
        ipaddress.ip_address("2001:db8::2"),
        ipaddress.ip_address("fe80::2"),
    ),
    "v4only": (ipaddress.ip_address("198.51.100.7"),),
    "bare": (),
}


def listeners(*lines: str) -> tuple[Listener, ...]:
    return parse_text("listeners:\n" + "".join(f"  - {line}\n" for line in lines), "t").listeners


def rows(bindings: Sequence[Binding]) -> list[tuple[str, str, bool]]:
    """Each binding as (listener name, socket label, V6ONLY)."""
    return [(b.listener.name, b.label, b.name.v6only) for b in bindings]


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        # "*" is two sockets: 0.0.0.0 and [::] with V6ONLY=1, never bindv6only's choice.
        ('{interface: "*", port: 53}', [("0.0.0.0:53", False), ("[::]:53", True)]),
        ('{interface: "*", port: 53, family: ipv4}', [("0.0.0.0:53", False)]),
        ('{interface: "*", port: 53, family: ipv6}', [("[::]:53", True)]),
        ('{interface: "*", port: 53, family: dual}', [("[::]:53", False)]),
        (
            '{interface: "*", port: 53, device: eth0}',
            [("0.0.0.0:53%eth0", False), ("[::]:53%eth0", True)],
        ),
        ("{interface: 0.0.0.0, port: 53}", [("0.0.0.0:53", False)]),
        ('{interface: "::", port: 53}', [("[::]:53", True)]),
        ('{interface: "::", port: 53, family: dual}', [("[::]:53", False)]),
        ("{interface: 127.0.0.1, port: 1060}", [("127.0.0.1:1060", False)]),
        ("{interface: 192.0.2.10, port: 1060, device: eth0}", [("192.0.2.10:1060%eth0", False)]),
        ('{interface: "::1", port: 1060}', [("[::1]:1060", True)]),
        # A v4-mapped address cannot be bound with V6ONLY=1.
        ('{interface: "::ffff:127.0.0.1", port: 1060}', [("[::ffff:127.0.0.1]:1060", False)]),
        # A link-local zone becomes the socket's device.
        ('{interface: "fe80::1%eth0", port: 1060}', [("[fe80::1%eth0]:1060", True)]),
        ('{interface: "fe80::1", port: 1060, device: eth0}', [("[fe80::1%eth0]:1060", True)]),
    ],
)
def test_wildcards_and_literals(listener: str, expected: list[tuple[str, bool]]) -> None:
    (parsed,) = listeners(listener)
    found, reason = expand(parsed, {})
    assert reason == ""
    assert [(b.label, b.name.v6only) for b in found] == expected


def test_link_local_zone_is_the_device() -> None:
    (parsed,) = listeners('{interface: "fe80::1%eth0", port: 1060}')
    ((binding,), _) = expand(parsed, {})
    assert binding.name.device == "eth0"
    assert binding.name.address == ipaddress.ip_address("fe80::1")
    assert binding.name.is_link_local


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        ("{interface: lo, port: 1060}", [("127.0.0.1:1060", False), ("[::1]:1060", True)]),
        ("{interface: lo, port: 1060, family: ipv4}", [("127.0.0.1:1060", False)]),
        ("{interface: lo, port: 1060, family: ipv6}", [("[::1]:1060", True)]),
        (
            "{interface: eth0, port: 1060}",
            [
                ("192.0.2.2:1060", False),
                ("[2001:db8::2]:1060", True),
                # IPv6 link-local addresses are bound with their zone: the interface.
                ("[fe80::2%eth0]:1060", True),
            ],
        ),
        (
            "{interface: eth0, port: 1060, device: eth0}",
            [
                ("192.0.2.2:1060%eth0", False),
                ("[2001:db8::2]:1060%eth0", True),
                ("[fe80::2%eth0]:1060", True),
            ],
        ),
        # A device that is not the interface cannot carry the link-local address's zone.
        (
            "{interface: eth0, port: 1060, device: lo}",
            [("192.0.2.2:1060%lo", False), ("[2001:db8::2]:1060%lo", True)],
        ),
    ],
)
def test_interface_names(listener: str, expected: list[tuple[str, bool]]) -> None:
    (parsed,) = listeners(listener)
    found, reason = expand(parsed, INTERFACES)
    assert reason == ""
    assert [(b.label, b.name.v6only) for b in found] == expected
    assert all(b.listener is parsed for b in found)


@pytest.mark.parametrize(
    ("listener", "reason"),
    [
        ("{interface: eth9, port: 1060}", "interface eth9 does not exist"),
        ("{interface: bare, port: 1060}", "interface bare has no address"),
        ("{interface: v4only, port: 1060, family: ipv6}", "interface v4only has no IPv6 address"),
        ("{interface: lo, port: 1060, family: ipv4}", ""),
    ],
)
def test_interface_without_addresses(listener: str, reason: str) -> None:
    (parsed,) = listeners(listener)
    found, why = expand(parsed, INTERFACES)
    assert why == reason
    assert (found == []) == bool(reason)


def test_expand_all_keeps_config_order_and_skips_disabled() -> None:
    parsed = listeners(
        "{name: a, interface: lo, port: 1}",
        "{name: disabled, interface: 127.0.0.1, port: 2, enabled: false}",
        "{name: gone, interface: eth9, port: 3, required: false}",
        '{name: w, interface: "*", port: 4}',
        "{name: disabled2, interface: eth9, port: 5, enabled: false}",
    )
    expansion = expand_all(parsed, INTERFACES)
    assert rows(expansion.bindings) == [
        ("a", "127.0.0.1:1", False),
        ("a", "[::1]:1", True),
        ("w", "0.0.0.0:4", False),
        ("w", "[::]:4", True),
    ]
    assert [(u.listener.name, u.reason) for u in expansion.unresolved] == [
        ("gone", "interface eth9 does not exist")
    ]


def test_no_interfaces_at_all() -> None:
    parsed = listeners(
        "{name: a, interface: lo, port: 1}", "{name: b, interface: 127.0.0.1, port: 2}"
    )
    expansion = expand_all(parsed, {})
    assert rows(expansion.bindings) == [("b", "127.0.0.1:2", False)]
    assert [(u.listener.name, u.reason) for u in expansion.unresolved] == [
        ("a", "interface lo does not exist")
    ]


def test_bindings_are_values() -> None:
    (parsed,) = listeners('{interface: "*", port: 53}')
    first, _ = expand(parsed, {})
    second, _ = expand(parsed, {})
    assert first == second
    assert len({*first, *second}) == 2
