"""Configuration loading: good files build the expected model, bad ones give exact problems.

The table of bad files follows blackbox_exporter's config/testdata: one failure kind per file,
each with the exact ``FILE:LINE: path: message`` lines ``udpbindd check`` prints.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from udpbindd import config, yamlsrc
from udpbindd.config import (
    Config,
    ConfigError,
    Endpoint,
    Family,
    InterfaceName,
    IOMode,
    Literal,
    LogFormat,
    LogLevel,
    Responder,
    Wildcard,
    load,
    parse_bytes,
    parse_text,
)
from udpbindd.yamlsrc import Problem

TESTDATA = Path(__file__).parent / "testdata"
EXAMPLE = Path(__file__).parent.parent / "config" / "udpbindd.example.yaml"
LISTENER_KNOWN = (
    "allow, bind_timeout, deny, device, drop_rate, enabled, family, freebind, interface, name, "
    "port, rate_limit, recv_buffer, reflection_guard, required, responder, reuse_port"
)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path)
    return [str(problem) for problem in caught.value.problems]


def text_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_text(text, "t.yaml")
    return [str(problem) for problem in caught.value.problems]


def one(listener_yaml: str) -> list[str]:
    """The problems of a file with one listener given as a flow mapping on line 2."""
    return text_problems(f"listeners:\n  - {listener_yaml}\n")


# ---------------------------------------------------------------------------------------------
# testdata: one failure kind per file

BAD_FILES = [
    (
        "bad-unknown-key.yaml",
        ["bad-unknown-key.yaml:4: listeners[0].prot: unknown key (did you mean 'port'?)"],
    ),
    (
        "bad-unknown-top-key.yaml",
        ["bad-unknown-top-key.yaml:2: listener: unknown key (did you mean 'listeners'?)"],
    ),
    (
        "bad-duplicate-key.yaml",
        ["bad-duplicate-key.yaml:5: listeners[0].port: duplicate key (first given on line 3)"],
    ),
    (
        "bad-port-bool.yaml",
        [
            "bad-port-bool.yaml:3: listeners[0].port: "
            "expected a port number 1..65535, got a boolean (true)"
        ],
    ),
    (
        "bad-port-string.yaml",
        [
            "bad-port-string.yaml:3: listeners[0].port: "
            "expected a port number 1..65535, got a string ('1060')"
        ],
    ),
    ("bad-port-zero.yaml", ["bad-port-zero.yaml:3: listeners[0].port: 0 is not in 1..65535"]),
    (
        "bad-port-range.yaml",
        ["bad-port-range.yaml:3: listeners[0].port: 70000 is not in 1..65535"],
    ),
    (
        "bad-port-missing.yaml",
        ["bad-port-missing.yaml:2: listeners[0].port: required: a port number 1..65535"],
    ),
    (
        "bad-drop-rate-range.yaml",
        ["bad-drop-rate-range.yaml:4: listeners[0].drop_rate: 1.5 is not in 0.0..1.0"],
    ),
    (
        "bad-drop-rate-type.yaml",
        [
            "bad-drop-rate-type.yaml:4: listeners[0].drop_rate: "
            "expected a number 0.0..1.0, got a string ('x')"
        ],
    ),
    (
        "bad-recv-buffer.yaml",
        [
            "bad-recv-buffer.yaml:4: listeners[0].recv_buffer: "
            "expected a size such as 4MiB or 262144, got a string ('lots')"
        ],
    ),
    (
        "bad-family-ipv6-on-ipv4.yaml",
        [
            "bad-family-ipv6-on-ipv4.yaml:4: listeners[0].family: "
            "family ipv6 does not fit the IPv4 address 127.0.0.1"
        ],
    ),
    (
        "bad-family-ipv4-on-ipv6.yaml",
        [
            "bad-family-ipv4-on-ipv6.yaml:4: listeners[0].family: "
            "family ipv4 does not fit the IPv6 address ::1"
        ],
    ),
    (
        "bad-family-unknown.yaml",
        ["bad-family-unknown.yaml:4: listeners[0].family: 'ipv5' is not one of: ipv4, ipv6, dual"],
    ),
    (
        "bad-dual-specific.yaml",
        [
            "bad-dual-specific.yaml:4: listeners[0].family: "
            'family dual is only for the wildcard ("*" or "::")'
        ],
    ),
    (
        "bad-link-local-no-zone.yaml",
        [
            "bad-link-local-no-zone.yaml:2: listeners[0].interface: "
            "link-local fe80::1 needs a zone (fe80::1%eth0) or a device"
        ],
    ),
    (
        "bad-zone-not-link-local.yaml",
        [
            "bad-zone-not-link-local.yaml:2: listeners[0].interface: "
            "'2001:db8::1%eth0': a %zone is only for IPv6 link-local addresses"
        ],
    ),
    (
        "bad-address.yaml",
        [
            "bad-address.yaml:2: listeners[0].interface: '192.0.2.300' is not a valid address: "
            "Octet 300 (> 255) not permitted in '192.0.2.300'"
        ],
    ),
    (
        "bad-interface-name.yaml",
        [
            "bad-interface-name.yaml:2: listeners[0].interface: "
            "'eth0/1' is not an IP address, \"*\" or an interface name"
        ],
    ),
    (
        "bad-device.yaml",
        [
            "bad-device.yaml:4: listeners[0].device: "
            "'averyveryverylongname' is not an interface name"
        ],
    ),
    (
        "bad-responder.yaml",
        [
            "bad-responder.yaml:4: listeners[0].responder: "
            "'shout' is not one of: size, echo, discard"
        ],
    ),
    (
        "bad-flag-type.yaml",
        [
            "bad-flag-type.yaml:4: listeners[0].reuse_port: "
            "expected true or false, got a string ('yes')"
        ],
    ),
    (
        "bad-duplicate-name.yaml",
        ["bad-duplicate-name.yaml:5: listeners[1].name: duplicate name 'dns' (also listeners[0])"],
    ),
    (
        "bad-metrics-listen.yaml",
        [
            "bad-metrics-listen.yaml:5: metrics.listen[1]: "
            "'::1:9917' is not ADDRESS:PORT (IPv6 in brackets: [::1]:9917)",
            "bad-metrics-listen.yaml:6: metrics.listen[2]: "
            "'localhost:9917': 'localhost' is not an IPv4 address",
            "bad-metrics-listen.yaml:7: metrics.listen[3]: "
            "'127.0.0.1:0': port 0 is not in 1..65535",
            "bad-metrics-listen.yaml:8: metrics.listen[4]: expected an address such as "
            '"127.0.0.1:9917" or "[::1]:9917", got a number (9917)',
        ],
    ),
    (
        "bad-logging.yaml",
        [
            "bad-logging.yaml:3: logging.level: "
            "'verbose' is not one of: debug, info, warning, error",
            "bad-logging.yaml:4: logging.format: 'xml' is not one of: auto, json, console",
        ],
    ),
    (
        "bad-top-level-list.yaml",
        ["bad-top-level-list.yaml:1: (top level): expected a mapping, got a list"],
    ),
    (
        "bad-listeners-missing.yaml",
        ["bad-listeners-missing.yaml:1: listeners: required: a list of listeners"],
    ),
    (
        "bad-multi-document.yaml",
        [
            "bad-multi-document.yaml:2: invalid YAML: "
            "a second document starts here (---); the file must hold exactly one"
        ],
    ),
    (
        "bad-syntax.yaml",
        [
            "bad-syntax.yaml:3: invalid YAML: mapping values are not allowed here "
            "(is the indentation right, or a ': ' inside unquoted text?)"
        ],
    ),
    (
        "bad-unquoted-star.yaml",
        [
            "bad-unquoted-star.yaml:2: invalid YAML: "
            'a bare * starts a YAML alias; quote the wildcard as "*"'
        ],
    ),
    ("bad-empty.yaml", ["bad-empty.yaml: empty file: expected a mapping with 'listeners'"]),
    (
        "bad-comments-only.yaml",
        ["bad-comments-only.yaml: empty file: expected a mapping with 'listeners'"],
    ),
    (
        "bad-many.yaml",
        [
            "bad-many.yaml:5: listeners[0].port: 0 is not in 1..65535",
            "bad-many.yaml:6: listeners[0].drop_rate: 2 is not in 0.0..1.0",
            "bad-many.yaml:7: listeners[1].name: duplicate name 'one' (also listeners[0])",
            "bad-many.yaml:12: listeners[2].family: family ipv4 does not fit the IPv6 address ::1",
            "bad-many.yaml:13: listeners[3].interface: "
            "'10.0.0' is not a valid address: Expected 4 octets in '10.0.0'",
            "bad-many.yaml:14: listeners[3].port: "
            "expected a port number 1..65535, got a boolean (true)",
            f"bad-many.yaml:15: listeners[3].colour: unknown key (known: {LISTENER_KNOWN})",
            "bad-many.yaml:17: listeners[3].recv_buffer: duplicate key (first given on line 16)",
            "bad-many.yaml:19: metrics.listen: "
            "'localhost' is not ADDRESS:PORT (IPv6 in brackets: [::1]:9917)",
            "bad-many.yaml:21: logging.level: 'loud' is not one of: debug, info, warning, error",
        ],
    ),
    (
        "bad-allow-host-bits.yaml",
        [
            "bad-allow-host-bits.yaml:6: listeners[0].allow[1]: '192.168.1.10/24' has host bits "
            "set: write 192.168.1.0/24 for the network, or 192.168.1.10/32 for one address"
        ],
    ),
    (
        "bad-allow-empty.yaml",
        [
            "bad-allow-empty.yaml:4: listeners[0].allow: an empty allow list would refuse every "
            "source: list the sources to allow, or remove the key to allow all"
        ],
    ),
    (
        "bad-deny-entry.yaml",
        [
            "bad-deny-entry.yaml:4: listeners[0].deny[0]: "
            "'2001:db8::/129' is not an address or network: '129' is not a valid netmask",
            "bad-deny-entry.yaml:4: listeners[0].deny[1]: "
            "'fe80::/10%eth0': an access list takes no %zone",
            "bad-deny-entry.yaml:4: listeners[0].deny[3]: "
            "'::ffff:10.0.0.0/104' is 10.0.0.0/8, already listed as listeners[0].deny[2]",
        ],
    ),
    (
        "bad-rate-limit.yaml",
        [
            "bad-rate-limit.yaml:4: listeners[0].rate_limit.burst: "
            "required: the packets one source may send at once, e.g. 20",
            "bad-rate-limit.yaml:5: listeners[0].rate_limit.packets_per_second: "
            "0 is not in 0..1000000 (above 0)",
            "bad-rate-limit.yaml:6: listeners[0].rate_limit.ipv6_prefix: 129 is not in 1..128",
            "bad-rate-limit.yaml:7: listeners[0].rate_limit.max_source: "
            "unknown key (did you mean 'max_sources'?)",
        ],
    ),
    (
        "bad-reflection-guard.yaml",
        [
            "bad-reflection-guard.yaml:5: listeners[0].reflection_guard.ports[0]: "
            "0 is not in 1..65535 (source port 0 is always refused)",
            "bad-reflection-guard.yaml:5: listeners[0].reflection_guard.ports[2]: "
            "53 is listed twice (also listeners[0].reflection_guard.ports[1])",
            "bad-reflection-guard.yaml:5: listeners[0].reflection_guard.ports[3]: "
            "70000 is not in 1..65535",
            "bad-reflection-guard.yaml:6: listeners[0].reflection_guard.max_amplification: "
            "0.5 is not in 1.0..100.0",
            "bad-reflection-guard.yaml:9: listeners[1].reflection_guard: "
            "expected a mapping, got a boolean (false) (write {enabled: false})",
        ],
    ),
    (
        "bad-user.yaml",
        [
            "bad-user.yaml:2: user: 'udp bind' is not a user name "
            "(letters, digits, '_', '.', '-'; at most 32 characters)"
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), BAD_FILES, ids=[name for name, _ in BAD_FILES])
def test_bad_file(name: str, expected: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTDATA)
    assert problems_of(Path(name)) == expected


def test_every_bad_file_is_in_the_table() -> None:
    on_disk = {path.name for path in TESTDATA.glob("bad-*.yaml")}
    assert on_disk == {name for name, _ in BAD_FILES}


def test_problems_are_in_file_order() -> None:
    with pytest.raises(ConfigError) as caught:
        load(TESTDATA / "bad-many.yaml")
    lines = [problem.line for problem in caught.value.problems]
    assert lines == sorted(lines)
    assert len(lines) == 10


def test_config_error_message_is_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_text("listeners:\n  - {interface: 127.0.0.1, port: 0, drop_rate: 9}\n", "t.yaml")
    assert str(caught.value) == (
        "t.yaml:2: listeners[0].port: 0 is not in 1..65535\n"
        "t.yaml:2: listeners[0].drop_rate: 9 is not in 0.0..1.0"
    )


# ---------------------------------------------------------------------------------------------
# good files


def test_listeners_with_equal_settings_share_them_and_replace_changes_one() -> None:
    cfg = parse_text(
        "listeners:\n"
        "  - {interface: 127.0.0.1, port: 5000}\n"
        "  - {interface: 127.0.0.2, port: 5000, responder: echo}\n"
        "  - {interface: 127.0.0.3, port: 5000, responder: echo}\n",
        "t.yaml",
    )
    plain, echo, echo_too = cfg.listeners
    assert plain.settings is config.DEFAULT_SETTINGS
    assert echo.settings is echo_too.settings  # one object for 2 (or 10,000) equal ones
    assert echo.responder is Responder.ECHO
    assert echo.reuse_port is False
    # A setting given to replace() changes only that setting, as on any dataclass.
    moved = dataclasses.replace(echo, port=5001, reuse_port=True, line=9)
    assert (moved.port, moved.reuse_port, moved.responder, moved.line) == (
        5001,
        True,
        Responder.ECHO,
        9,
    )
    assert echo.reuse_port is False
    assert dataclasses.replace(echo, line=echo.line) == echo
    assert dataclasses.replace(echo, responder=Responder.SIZE) != echo
    assert (
        config.Listener(
            "127.0.0.2:5000",
            "127.0.0.2",
            echo.target,
            5000,
            responder=Responder.ECHO,
            line=echo.line,
        )
        == echo
    )


def test_good_file_builds_every_field() -> None:
    cfg = load(TESTDATA / "good.yaml")
    assert cfg.source == str(TESTDATA / "good.yaml")
    classic, everything, dual, lo, link_local = cfg.listeners
    assert classic == config.Listener(
        name="classic",
        interface="127.0.0.1",
        target=Literal(ipaddress.ip_address("127.0.0.1")),
        port=1060,
        line=3,
    )
    assert everything == config.Listener(
        name="everything",
        interface="::1",
        target=Literal(ipaddress.ip_address("::1")),
        port=1061,
        family=Family.IPV6,
        responder=Responder.ECHO,
        drop_rate=0.5,
        device="lo",
        reuse_port=True,
        freebind=True,
        recv_buffer=512 * 1024,
        required=False,
        enabled=True,
        allow=(
            ipaddress.ip_network("::1/128"),
            ipaddress.ip_network("2001:db8::/32"),
            ipaddress.ip_network("127.0.0.0/8"),  # written as ::ffff:127.0.0.0/104
        ),
        deny=(ipaddress.ip_network("2001:db8:bad::/48"),),
        rate_limit=config.RateLimit(
            packets_per_second=2.5, burst=20, ipv6_prefix=56, max_sources=1024
        ),
        reflection_guard=config.ReflectionPolicy(
            enabled=True, ports=(53, 5060), max_amplification=1.5
        ),
        line=6,
    )
    assert (dual.name, dual.target, dual.family, dual.enabled) == (
        "*:1062/dual",
        Wildcard(),
        Family.DUAL,
        False,
    )
    assert dual.responder is Responder.DISCARD
    assert (lo.name, lo.target, lo.recv_buffer) == ("lo:1063/ipv4", InterfaceName("lo"), 262144)
    assert link_local.target == Literal(ipaddress.ip_address("fe80::1"), "lo")
    assert link_local.name == "[fe80::1%lo]:1064"
    assert link_local.recv_buffer == 4 * 1024 * 1024
    assert cfg.enabled_listeners == (classic, everything, lo)
    assert cfg.metrics.listen == (Endpoint("::1", 9917),)
    assert cfg.logging == config.LoggingConfig(LogLevel.DEBUG, LogFormat.JSON)
    assert cfg.user == "nobody"


def test_config_is_immutable() -> None:
    cfg = load(TESTDATA / "good.yaml")
    with pytest.raises(AttributeError):
        cfg.listeners[0].port = 1  # type: ignore[misc]
    assert isinstance(cfg.listeners, tuple)


def test_valid_merge_keys() -> None:
    cfg = load(TESTDATA / "good-merge.yaml")
    first, second, third = cfg.listeners
    assert (first.name, first.port, first.responder, first.drop_rate) == (
        "first",
        1060,
        Responder.ECHO,
        0.1,
    )
    # Merged keys fill in; the listener's own keys win.
    assert (second.name, str(second.interface), second.port, second.responder) == (
        "second",
        "127.0.0.1",
        1061,
        Responder.ECHO,
    )
    assert second.drop_rate == 0.1
    # In a list of merged mappings the earlier one wins, so *base's port beats 1099.
    assert (third.name, third.interface, third.port, third.recv_buffer) == (
        "third",
        "::1",
        1060,
        1024 * 1024,
    )
    assert cfg.metrics.listen == ()


def test_embedded_default() -> None:
    cfg = config.load_default()
    assert cfg.source == config.EMBEDDED_NAME
    (classic,) = cfg.listeners
    assert (classic.name, classic.interface, classic.port, classic.responder) == (
        "classic",
        "127.0.0.1",
        1060,
        Responder.SIZE,
    )
    assert cfg.metrics.listen == (Endpoint("127.0.0.1", 9917),)


def test_defaults_of_an_optional_listener_key() -> None:
    (listener,) = parse_text("listeners:\n  - {interface: 127.0.0.1, port: 1060}\n", "t").listeners
    assert listener == config.Listener(
        name="127.0.0.1:1060",
        interface="127.0.0.1",
        target=Literal(ipaddress.ip_address("127.0.0.1")),
        port=1060,
        family=None,
        responder=Responder.SIZE,
        drop_rate=0.0,
        device="",
        reuse_port=False,
        freebind=False,
        recv_buffer=config.DEFAULT_RECV_BUFFER,
        required=True,
        enabled=True,
        allow=(),
        deny=(),
        rate_limit=None,
        reflection_guard=config.ReflectionPolicy(
            enabled=True, ports=config.DEFAULT_REFLECTION_PORTS, max_amplification=2.0
        ),
        line=2,
    )


# ---------------------------------------------------------------------------------------------
# source policy: allow, deny, rate_limit, reflection_guard, user


def net(text: str) -> config.Network:
    return ipaddress.ip_network(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.0/8", (net("10.0.0.0/8"),)),
        ("[10.0.0.0/8]", (net("10.0.0.0/8"),)),
        ("[192.0.2.7]", (net("192.0.2.7/32"),)),
        ('["2001:db8::1"]', (net("2001:db8::1/128"),)),
        ('["2001:db8::/32", " 192.0.2.0/24 "]', (net("2001:db8::/32"), net("192.0.2.0/24"))),
        # v4-mapped networks and addresses are the IPv4 ones they stand for.
        ('["::ffff:10.0.0.0/104"]', (net("10.0.0.0/8"),)),
        ('["::ffff:192.0.2.7"]', (net("192.0.2.7/32"),)),
        ('["::ffff:0.0.0.0/96"]', (net("0.0.0.0/0"),)),
        # Wider than ::ffff:0:0/96, so not an IPv4 network: it stays IPv6.
        ('["::fffe:0:0/95"]', (net("::fffe:0:0/95"),)),
        ("[10.0.0.0/255.0.0.0]", (net("10.0.0.0/8"),)),
        ('["::/0", 0.0.0.0/0]', (net("::/0"), net("0.0.0.0/0"))),
    ],
)
def test_access_lists_accepted(value: str, expected: tuple[config.Network, ...]) -> None:
    (parsed,) = parse_text(
        f"listeners:\n  - {{interface: 127.0.0.1, port: 1, allow: {value}, deny: {value}}}\n",
        "t",
    ).listeners
    assert parsed.allow == expected
    assert parsed.deny == expected


def test_an_empty_deny_list_is_no_deny_list() -> None:
    (parsed,) = parse_text(
        "listeners:\n  - {interface: 127.0.0.1, port: 1, deny: []}\n", "t"
    ).listeners
    assert parsed.deny == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "7",
            "allow: expected a list of addresses or networks, got a number (7)",
        ),
        (
            "[7]",
            "allow[0]: expected an address or network such as 192.0.2.0/24 or 2001:db8::/32, "
            "got a number (7)",
        ),
        ("[eth0]", "allow[0]: 'eth0' is not an address or network: Expected 4 octets in 'eth0'"),
        (
            "[10.0.0.0/33]",
            "allow[0]: '10.0.0.0/33' is not an address or network: '33' is not a valid netmask",
        ),
        (
            '["::ffff:10.0.0.1/104"]',
            "allow[0]: '::ffff:10.0.0.1/104' has host bits set: write 10.0.0.0/8 for the "
            "network, or 10.0.0.1/32 for one address",
        ),
        (
            '["2001:db8::1/32"]',
            "allow[0]: '2001:db8::1/32' has host bits set: write 2001:db8::/32 for the network, "
            "or 2001:db8::1/128 for one address",
        ),
        ('["fe80::1%eth0"]', "allow[0]: 'fe80::1%eth0': an access list takes no %zone"),
        (
            "[10.0.0.0/8, 10.0.0.0/8]",
            "allow[1]: 10.0.0.0/8 is listed twice (also listeners[0].allow[0])",
        ),
    ],
)
def test_access_lists_rejected(value: str, expected: str) -> None:
    assert one(f"{{interface: 127.0.0.1, port: 1, allow: {value}}}") == [
        f"t.yaml:2: listeners[0].{expected}"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "{packets_per_second: 10, burst: 20}",
            config.RateLimit(10.0, 20, ipv6_prefix=64, max_sources=65536),
        ),
        (
            "{packets_per_second: 0.5, burst: 1, ipv6_prefix: 128, max_sources: 1}",
            config.RateLimit(0.5, 1, ipv6_prefix=128, max_sources=1),
        ),
        (
            "{packets_per_second: 1000000, burst: 1000000, ipv6_prefix: 1, max_sources: 4194304}",
            config.RateLimit(1e6, 1_000_000, ipv6_prefix=1, max_sources=4_194_304),
        ),
    ],
)
def test_rate_limit_accepted(value: str, expected: config.RateLimit) -> None:
    (parsed,) = parse_text(
        f"listeners:\n  - {{interface: 127.0.0.1, port: 1, rate_limit: {value}}}\n", "t"
    ).listeners
    assert parsed.rate_limit == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "{burst: 1}",
            ["packets_per_second: required: the packets a second one source may send, e.g. 10"],
        ),
        (
            "{packets_per_second: -1, burst: 1}",
            ["packets_per_second: -1 is not in 0..1000000 (above 0)"],
        ),
        (
            "{packets_per_second: .nan, burst: 1}",
            ["packets_per_second: nan is not in 0..1000000 (above 0)"],
        ),
        (
            "{packets_per_second: 1000001, burst: 1}",
            ["packets_per_second: 1000001 is not in 0..1000000 (above 0)"],
        ),
        (
            "{packets_per_second: '10', burst: 1}",
            ["packets_per_second: expected a number of packets a second, got a string ('10')"],
        ),
        (
            "{packets_per_second: true, burst: 1}",
            ["packets_per_second: expected a number of packets a second, got a boolean (true)"],
        ),
        (
            "{packets_per_second: 1, burst: 1.5}",
            ["burst: expected a whole number 1..1000000, got a number (1.5)"],
        ),
        ("{packets_per_second: 1, burst: 0}", ["burst: 0 is not in 1..1000000"]),
        (
            "{packets_per_second: 1, burst: 1, ipv6_prefix: 0}",
            ["ipv6_prefix: 0 is not in 1..128"],
        ),
        (
            "{packets_per_second: 1, burst: 1, max_sources: 0}",
            ["max_sources: 0 is not in 1..4194304"],
        ),
        (
            "{packets_per_second: 1, burst: 1, max_sources: 4194305}",
            ["max_sources: 4194305 is not in 1..4194304"],
        ),
    ],
)
def test_rate_limit_rejected(value: str, expected: list[str]) -> None:
    assert one(f"{{interface: 127.0.0.1, port: 1, rate_limit: {value}}}") == [
        f"t.yaml:2: listeners[0].rate_limit.{message}" for message in expected
    ]


def test_rate_limit_shape() -> None:
    assert one("{interface: 127.0.0.1, port: 1, rate_limit: 10}") == [
        "t.yaml:2: listeners[0].rate_limit: expected a mapping, got a number (10)"
    ]
    assert text_problems(
        "listeners:\n  - interface: 127.0.0.1\n    port: 1\n    rate_limit:\n"
    ) == ["t.yaml:4: listeners[0].rate_limit: expected a mapping, got nothing (null)"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{}", config.ReflectionPolicy()),
        ("null", config.ReflectionPolicy()),
        ("{enabled: false}", config.ReflectionPolicy(enabled=False)),
        ("{ports: []}", config.ReflectionPolicy(ports=())),
        ("{ports: [11211, 7, 5060]}", config.ReflectionPolicy(ports=(7, 5060, 11211))),
        ("{max_amplification: 1}", config.ReflectionPolicy(max_amplification=1.0)),
        ("{max_amplification: 100}", config.ReflectionPolicy(max_amplification=100.0)),
    ],
)
def test_reflection_guard_accepted(value: str, expected: config.ReflectionPolicy) -> None:
    (parsed,) = parse_text(
        f"listeners:\n  - {{interface: 127.0.0.1, port: 1, reflection_guard: {value}}}\n", "t"
    ).listeners
    assert parsed.reflection_guard == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", ": expected a mapping, got a boolean (true) (write {enabled: true})"),
        ("[53]", ": expected a mapping, got a list"),
        ("{enabled: 'no'}", ".enabled: expected true or false, got a string ('no')"),
        ("{ports: 53}", ".ports: expected a list of port numbers, got a number (53) "
         "(write [] for none but port 0)"),
        ("{ports: [dns]}", ".ports[0]: expected a port number 1..65535, got a string ('dns')"),
        ("{ports: [true]}", ".ports[0]: expected a port number 1..65535, got a boolean (true)"),
        ("{max_amplification: 0.99}", ".max_amplification: 0.99 is not in 1.0..100.0"),
        ("{max_amplification: .inf}", ".max_amplification: inf is not in 1.0..100.0"),
        ("{max_amplification: 100.5}", ".max_amplification: 100.5 is not in 1.0..100.0"),
        ("{max_amplification: x}", ".max_amplification: expected a number 1.0..100.0, "
         "got a string ('x')"),
        ("{port: [7]}", ".port: unknown key (did you mean 'ports'?)"),
    ],
)  # fmt: skip
def test_reflection_guard_rejected(value: str, expected: str) -> None:
    assert one(f"{{interface: 127.0.0.1, port: 1, reflection_guard: {value}}}") == [
        f"t.yaml:2: listeners[0].reflection_guard{expected}"
    ]


def test_default_reflection_ports_are_documented() -> None:
    assert tuple(sorted(config.REFLECTION_PORTS)) == config.DEFAULT_REFLECTION_PORTS
    # The classic loop and amplification ports, at least.
    assert {7, 9, 13, 17, 19, 37, 53, 111, 123, 137, 161, 389, 1900, 5353, 11211} <= set(
        config.DEFAULT_REFLECTION_PORTS
    )
    assert 0 not in config.DEFAULT_REFLECTION_PORTS  # refused always, not as a listed port
    # docs/security.md gives every default port a row saying why it is there.
    security = (Path(__file__).parent.parent / "docs" / "security.md").read_text()
    rows = set(re.findall(r"^\| (\d+) \| `?([\w-]+)`? \|", security, re.MULTILINE))
    assert {(str(port), name) for port, name in config.REFLECTION_PORTS.items()} <= rows


@pytest.mark.parametrize(
    "name", ["udpbindd", "_udpbindd", "svc-udp", "a.b", "Debian-exim", "smb$", "x" * 32, "1abc"]
)
def test_user_accepted(name: str) -> None:
    assert parse_text(f"listeners: []\nuser: '{name}'\n", "t").user == name


def test_no_user_means_no_switch() -> None:
    assert parse_text("listeners: []\n", "t").user == ""


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1000", "expected a user name, got a number (1000)"),
        ("'1000'", "'1000' is all digits: give a user name, not a uid"),
        ("''", "'' is not a user name (letters, digits, '_', '.', '-'; at most 32 characters)"),
        ("null", "expected a user name, got nothing (null)"),
        ("-x", "'-x' is not a user name (letters, digits, '_', '.', '-'; at most 32 characters)"),
        ("a/b", "'a/b' is not a user name (letters, digits, '_', '.', '-'; at most 32 characters)"),
        ("'..'", "'..' is not a user name (letters, digits, '_', '.', '-'; at most 32 characters)"),
        ("a$b", "'a$b' is not a user name (letters, digits, '_', '.', '-'; at most 32 characters)"),
        (
            "x" * 33,
            f"'{'x' * 33}' is not a user name (letters, digits, '_', '.', '-'; "
            "at most 32 characters)",
        ),
        ("[root]", "expected a user name, got a list"),
    ],
)
def test_user_rejected(value: str, message: str) -> None:
    assert text_problems(f"listeners: []\nuser: {value}\n") == [f"t.yaml:2: user: {message}"]


# ---------------------------------------------------------------------------------------------
# the file itself: missing, a directory, unreadable, not text


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert problems_of(path) == [f"{path}: no such file"]


def test_directory(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == [f"{tmp_path}: is a directory, not a file"]


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text("listeners: []\n")
    path.chmod(0)
    if os.access(path, os.R_OK):
        # Root reads files whatever their mode; tests/test_cli_check.py covers this case by
        # running the CLI as the unprivileged user nobody.
        pytest.skip("this user can read a mode-000 file (root): see the run-as-nobody test")
    assert problems_of(path) == [f"{path}: permission denied"]


def test_binary_garbage(tmp_path: Path) -> None:
    path = tmp_path / "garbage.yaml"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x03\x00>\x00")
    assert problems_of(path) == [f"{path}: binary data, not a YAML text file"]


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listeners:\n  - name: caf\xe9\n    interface: 127.0.0.1\n")
    assert problems_of(path) == [f"{path}:2: not valid UTF-8 text"]


def test_whitespace_only_file_is_empty() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bytes(b"   \n\n  \n", "w.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "w.yaml: empty file: expected a mapping with 'listeners'"
    ]


def test_utf16_file() -> None:
    data = "listeners: []\n".encode("utf-16")
    with pytest.raises(ConfigError) as caught:
        parse_bytes(data, "u.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "u.yaml: UTF-16 text: save the file as UTF-8"
    ]


def test_utf8_byte_order_mark_is_accepted() -> None:
    cfg = parse_bytes(b"\xef\xbb\xbflisteners: []\n", "bom.yaml")
    assert cfg.listeners == ()


def test_control_character_names_its_line() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bytes(b"listeners:\n  - name: a\x07b\n", "c.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "c.yaml:2: invalid YAML: character U+0007 is not allowed"
    ]


def test_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "MAX_FILE_BYTES", 16)
    path = tmp_path / "big.yaml"
    path.write_text("listeners: []\n# padding past sixteen bytes\n")
    assert problems_of(path) == [f"{path}: larger than 16 bytes"]


# ---------------------------------------------------------------------------------------------
# YAML shapes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello\n", ["t.yaml:1: (top level): expected a mapping, got a string ('hello')"]),
        ("null\n", ["t.yaml:1: (top level): expected a mapping, got nothing (null)"]),
        ("~\n", ["t.yaml:1: (top level): expected a mapping, got nothing (null)"]),
        ("42\n", ["t.yaml:1: (top level): expected a mapping, got a number (42)"]),
        (
            "listeners: {}\n",
            ["t.yaml:1: listeners: expected a list, got a mapping"],
        ),
        (
            "listeners:\n",
            ["t.yaml:1: listeners: expected a list, got nothing (null) (write [] for none)"],
        ),
        (
            "listeners:\n  - 1\n  - null\n  - [a]\n",
            [
                "t.yaml:2: listeners[0]: expected a mapping, got a number (1)",
                "t.yaml:3: listeners[1]: expected a mapping, got nothing (null)",
                "t.yaml:4: listeners[2]: expected a mapping, got a list",
            ],
        ),
        (
            "listeners:\n  - {}\n",
            [
                "t.yaml:2: listeners[0].port: required: a port number 1..65535",
                't.yaml:2: listeners[0].interface: required: an address, "*" or an interface name',
            ],
        ),
        (
            "yes: 1\n[a]: 2\nlisteners: []\n",
            [
                "t.yaml:1: (top level): key 'yes' reads as !!bool, not a string",
                "t.yaml:2: (top level): keys must be plain strings, not a list",
            ],
        ),
        (
            "listeners: []\nlisteners: []\n",
            ["t.yaml:2: listeners: duplicate key (first given on line 1)"],
        ),
        (
            "listeners:\n  - {interface: 127.0.0.1, port: 1, port: 2}\n",
            ["t.yaml:2: listeners[0].port: duplicate key (first given on line 2)"],
        ),
        (
            "listeners: [\n",
            [
                "t.yaml:2: invalid YAML: expected the node content, but found '<stream end>' "
                "(while parsing a flow node on line 2)"
            ],
        ),
        (
            "listeners:\n  - interface: *eth0\n    port: 1\n",
            [
                "t.yaml:2: invalid YAML: found undefined alias 'eth0' "
                "(a bare * starts a YAML alias; quote text that begins with *)"
            ],
        ),
        (
            "listeners: &l\n  - *l\n",
            ["t.yaml:1: listeners[0]: an alias refers to a value that contains it"],
        ),
        (
            "listeners:\n  - {interface: 127.0.0.1, port: !!int x}\n",
            ["t.yaml:2: listeners[0].port: 'x' is not a valid !!int"],
        ),
        (
            "listeners:\n  - {interface: 127.0.0.1, port: !!python/object:os.system x}\n",
            ["t.yaml:2: listeners[0].port: unsupported tag !!python/object:os.system"],
        ),
        (
            "listeners: !!set {a, b}\n",
            ["t.yaml:1: listeners: unsupported tag !!set on a mapping"],
        ),
        (
            "listeners:\n  - <<: 1\n    interface: 127.0.0.1\n    port: 1\n",
            ["t.yaml:2: listeners[0].<<: a merge takes a mapping or a list of mappings, not '1'"],
        ),
        (
            "listeners:\n  - &a {interface: 127.0.0.1, port: 1, name: a}\n"
            "  - <<: *a\n    <<: *a\n    name: b\n",
            ["t.yaml:4: listeners[1].<<: duplicate key (first given on line 3)"],
        ),
    ],
)
def test_yaml_shapes(text: str, expected: list[str]) -> None:
    assert text_problems(text) == expected


def test_nesting_too_deep_is_a_problem_not_a_crash() -> None:
    # Deep enough for our limit, shallow enough for PyYAML's own recursion.
    deep = text_problems("listeners: " + "[" * 70 + "]" * 70 + "\n")
    assert deep == [
        f"t.yaml:1: listeners{'[0]' * 64}: nested more than 64 levels deep",
        "t.yaml:1: listeners[0]: expected a mapping, got a list",
    ]
    # Deeper than PyYAML's recursive parser can go. libyaml's composer may still manage it
    # (it depends on the build and the stack), and then the depth limit reports it instead.
    deeper = text_problems("listeners: " + "[" * 5000 + "]" * 5000 + "\n")
    assert deeper[0] in (
        "t.yaml: invalid YAML: nested too deeply",
        f"t.yaml:1: listeners{'[0]' * 64}: nested more than 64 levels deep",
    )


def test_alias_bomb_is_cheap() -> None:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, 10):
        previous = "a" if level == 1 else f"l{level - 1}"
        lines.append(f"l{level}: &l{level} [{', '.join([f'*{previous}'] * 9)}]")
    lines.append("listeners: *l9")
    problems = text_problems("\n".join(lines) + "\n")
    # Ten unknown keys and nine listeners that are lists (each reported where the aliased
    # list was written): nothing is expanded 9**10 times.
    assert len(problems) == 19
    assert problems[-2:] == [
        "t.yaml:9: listeners[8]: expected a mapping, got a list",
        "t.yaml:10: l9: unknown key (known: io, listeners, logging, metrics, user)",
    ]


def test_an_anchored_listener_used_twice_is_a_duplicate_name() -> None:
    problems = text_problems(
        "listeners:\n  - &a\n    name: a\n    interface: 127.0.0.1\n    port: 1\n  - *a\n"
    )
    assert problems == ["t.yaml:3: listeners[1].name: duplicate name 'a' (also listeners[0])"]


# ---------------------------------------------------------------------------------------------
# listener keys, value by value


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        ("{interface: 127.0.0.1, port: 1_060}", 1060),
        ("{interface: 127.0.0.1, port: 0x424}", 1060),
        ("{interface: 127.0.0.1, port: 1}", 1),
        ("{interface: 127.0.0.1, port: 65535}", 65535),
    ],
)
def test_port_accepted(listener: str, expected: int) -> None:
    (parsed,) = parse_text(f"listeners:\n  - {listener}\n", "t").listeners
    assert parsed.port == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("true", "expected a port number 1..65535, got a boolean (true)"),
        ("'1060'", "expected a port number 1..65535, got a string ('1060')"),
        ("0", "0 is not in 1..65535"),
        ("70000", "70000 is not in 1..65535"),
        ("-1", "-1 is not in 1..65535"),
        ("1060.0", "expected a port number 1..65535, got a number (1060.0)"),
        ("2020-01-01", "expected a port number 1..65535, got a date (2020-01-01)"),
        ("null", "expected a port number 1..65535, got nothing (null)"),
        ("[1060]", "expected a port number 1..65535, got a list"),
    ],
)
def test_port_rejected(value: str, message: str) -> None:
    assert one(f"{{interface: 127.0.0.1, port: {value}}}") == [
        f"t.yaml:2: listeners[0].port: {message}"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("1", 1.0), ("0.25", 0.25), ("1.0", 1.0), ("0.0", 0.0)],
)
def test_drop_rate_accepted(value: str, expected: float) -> None:
    (parsed,) = parse_text(
        f"listeners:\n  - {{interface: 127.0.0.1, port: 1, drop_rate: {value}}}\n", "t"
    ).listeners
    assert parsed.drop_rate == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1.5", "1.5 is not in 0.0..1.0"),
        ("-0.1", "-0.1 is not in 0.0..1.0"),
        (".nan", "nan is not in 0.0..1.0"),
        (".inf", "inf is not in 0.0..1.0"),
        ("x", "expected a number 0.0..1.0, got a string ('x')"),
        ("'0.5'", "expected a number 0.0..1.0, got a string ('0.5')"),
        ("false", "expected a number 0.0..1.0, got a boolean (false)"),
    ],
)
def test_drop_rate_rejected(value: str, message: str) -> None:
    assert one(f"{{interface: 127.0.0.1, port: 1, drop_rate: {value}}}") == [
        f"t.yaml:2: listeners[0].drop_rate: {message}"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0.0), ("2", 2.0), ("0.5", 0.5), ("90", 90.0), ("86400", 86400.0)],
)
def test_bind_timeout_accepted(value: str, expected: float) -> None:
    (parsed,) = parse_text(
        f"listeners:\n  - {{interface: 127.0.0.1, port: 1, bind_timeout: {value}}}\n", "t"
    ).listeners
    assert parsed.bind_timeout == expected


def test_bind_timeout_default_is_systemds_start_timeout() -> None:
    (parsed,) = parse_text("listeners:\n  - {interface: 127.0.0.1, port: 1}\n", "t").listeners
    assert parsed.bind_timeout == config.DEFAULT_BIND_TIMEOUT == 90.0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "-1 is not in 0..86400 seconds"),
        ("86401", "86401 is not in 0..86400 seconds"),
        (".inf", "inf is not in 0..86400 seconds"),
        (".nan", "nan is not in 0..86400 seconds"),
        ("90s", "expected a number of seconds 0..86400, got a string ('90s')"),
        ("true", "expected a number of seconds 0..86400, got a boolean (true)"),
    ],
)
def test_bind_timeout_rejected(value: str, message: str) -> None:
    assert one(f"{{interface: 127.0.0.1, port: 1, bind_timeout: {value}}}") == [
        f"t.yaml:2: listeners[0].bind_timeout: {message}"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4MiB", 4 * 1024**2),
        ("512KiB", 512 * 1024),
        ("262144", 262144),
        ("1GiB", 1024**3),
        ("4M", 4 * 1024**2),
        ("4 MB", 4 * 1024**2),
        ("64k", 64 * 1024),
        ("100B", 100),
        ("'8192'", 8192),
    ],
)
def test_recv_buffer_accepted(value: str, expected: int) -> None:
    (parsed,) = parse_text(
        f"listeners:\n  - {{interface: 127.0.0.1, port: 1, recv_buffer: {value}}}\n", "t"
    ).listeners
    assert parsed.recv_buffer == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("lots", "expected a size such as 4MiB or 262144, got a string ('lots')"),
        ("4.5MiB", "expected a size such as 4MiB or 262144, got a string ('4.5MiB')"),
        ("4TiB", "expected a size such as 4MiB or 262144, got a string ('4TiB')"),
        ("-1", "-1 bytes is not in 1..1073741824 (1GiB)"),
        ("0", "0 bytes is not in 1..1073741824 (1GiB)"),
        ("2GiB", "2147483648 bytes is not in 1..1073741824 (1GiB)"),
        ("true", "expected a size such as 4MiB or 262144, got a boolean (true)"),
        ("1.5", "expected a size such as 4MiB or 262144, got a number (1.5)"),
    ],
)
def test_recv_buffer_rejected(value: str, message: str) -> None:
    assert one(f"{{interface: 127.0.0.1, port: 1, recv_buffer: {value}}}") == [
        f"t.yaml:2: listeners[0].recv_buffer: {message}"
    ]


@pytest.mark.parametrize(
    ("interface", "target"),
    [
        ('"*"', Wildcard()),
        ('" * "', Wildcard()),
        ("0.0.0.0", Literal(ipaddress.ip_address("0.0.0.0"))),
        ('"::"', Literal(ipaddress.ip_address("::"))),
        ("192.0.2.10", Literal(ipaddress.ip_address("192.0.2.10"))),
        ('"2001:db8::1"', Literal(ipaddress.ip_address("2001:db8::1"))),
        ('"[2001:db8::1]"', Literal(ipaddress.ip_address("2001:db8::1"))),
        ('"::ffff:192.0.2.10"', Literal(ipaddress.ip_address("::ffff:192.0.2.10"))),
        ('"fe80::1%eth0"', Literal(ipaddress.ip_address("fe80::1"), "eth0")),
        ('"[fe80::1%eth0]"', Literal(ipaddress.ip_address("fe80::1"), "eth0")),
        ("lo", InterfaceName("lo")),
        ("eth0.100", InterfaceName("eth0.100")),
        ("br-lan_2", InterfaceName("br-lan_2")),
        ("abcdefghijklmno", InterfaceName("abcdefghijklmno")),
    ],
)
def test_interface_accepted(interface: str, target: config.Target) -> None:
    (parsed,) = parse_text(f"listeners:\n  - {{interface: {interface}, port: 1}}\n", "t").listeners
    assert parsed.target == target


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        (
            '{interface: "", port: 1}',
            'listeners[0].interface: empty: give an address, "*" or an interface name',
        ),
        (
            "{interface: 12, port: 1}",
            'listeners[0].interface: expected an address, "*" or an interface name, '
            "got a number (12)",
        ),
        (
            "{interface: 1.2.3, port: 1}",
            "listeners[0].interface: '1.2.3' is not a valid address: Expected 4 octets in '1.2.3'",
        ),
        (
            '{interface: "fe80::1::2", port: 1}',
            "listeners[0].interface: 'fe80::1::2' is not a valid address: "
            "At most one '::' permitted in 'fe80::1::2'",
        ),
        (
            "{interface: abcdefghijklmnop, port: 1}",
            "listeners[0].interface: 'abcdefghijklmnop' is not an IP address, "
            '"*" or an interface name',
        ),
        (
            '{interface: "eth0:1", port: 1}',
            "listeners[0].interface: 'eth0:1' is not an IP address, \"*\" or an interface name",
        ),
        (
            '{interface: "has space", port: 1}',
            "listeners[0].interface: 'has space' is not an IP address, \"*\" or an interface name",
        ),
        (
            '{interface: "%eth0", port: 1}',
            "listeners[0].interface: '%eth0' is not an IP address, \"*\" or an interface name",
        ),
        (
            '{interface: "fe80::1", port: 1}',
            "listeners[0].interface: link-local fe80::1 needs a zone (fe80::1%eth0) or a device",
        ),
        (
            '{interface: "fe80::1%", port: 1}',
            "listeners[0].interface: 'fe80::1%': no interface after %",
        ),
        (
            '{interface: "fe80::1%a/b", port: 1}',
            "listeners[0].interface: 'fe80::1%a/b': 'a/b' is not an interface name",
        ),
        (
            '{interface: "::1%lo", port: 1}',
            "listeners[0].interface: '::1%lo': a %zone is only for IPv6 link-local addresses",
        ),
        (
            '{interface: "127.0.0.1%lo", port: 1}',
            "listeners[0].interface: '127.0.0.1%lo': a %zone is only for IPv6 link-local addresses",
        ),
        (
            '{interface: "fe80::1%eth0", port: 1, device: lo}',
            "listeners[0].device: device 'lo' is not the zone %eth0 of the address",
        ),
    ],
)
def test_interface_rejected(listener: str, expected: str) -> None:
    assert one(listener) == [f"t.yaml:2: {expected}"]


def test_link_local_with_a_device_needs_no_zone() -> None:
    (parsed,) = parse_text(
        'listeners:\n  - {interface: "fe80::1", port: 1, device: eth0}\n', "t"
    ).listeners
    assert (parsed.target, parsed.device) == (Literal(ipaddress.ip_address("fe80::1")), "eth0")


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        (
            "{interface: 127.0.0.1, port: 1, family: ipv6}",
            "listeners[0].family: family ipv6 does not fit the IPv4 address 127.0.0.1",
        ),
        (
            '{interface: "::1", port: 1, family: ipv4}',
            "listeners[0].family: family ipv4 does not fit the IPv6 address ::1",
        ),
        (
            '{interface: "::ffff:127.0.0.1", port: 1, family: ipv4}',
            "listeners[0].family: family ipv4 does not fit the IPv6 address ::ffff:127.0.0.1",
        ),
        (
            "{interface: 0.0.0.0, port: 1, family: ipv6}",
            "listeners[0].family: family ipv6 does not fit the IPv4 address 0.0.0.0",
        ),
        (
            "{interface: 0.0.0.0, port: 1, family: dual}",
            'listeners[0].family: family dual is only for the wildcard ("*" or "::")',
        ),
        (
            "{interface: 127.0.0.1, port: 1, family: dual}",
            'listeners[0].family: family dual is only for the wildcard ("*" or "::")',
        ),
        (
            "{interface: lo, port: 1, family: dual}",
            'listeners[0].family: family dual is only for the wildcard ("*" or "::")',
        ),
        (
            '{interface: "*", port: 1, family: 4}',
            "listeners[0].family: expected one of: ipv4, ipv6, dual, got a number (4)",
        ),
    ],
)
def test_family_rejected(listener: str, expected: str) -> None:
    assert one(listener) == [f"t.yaml:2: {expected}"]


@pytest.mark.parametrize(
    ("listener", "family"),
    [
        ('{interface: "*", port: 1, family: IPv4}', Family.IPV4),
        ('{interface: "*", port: 1, family: ipv6}', Family.IPV6),
        ('{interface: "*", port: 1, family: dual}', Family.DUAL),
        ('{interface: "::", port: 1, family: dual}', Family.DUAL),
        ("{interface: 127.0.0.1, port: 1, family: ipv4}", Family.IPV4),
        ('{interface: "::ffff:127.0.0.1", port: 1, family: ipv6}', Family.IPV6),
    ],
)
def test_family_accepted(listener: str, family: Family) -> None:
    (parsed,) = parse_text(f"listeners:\n  - {listener}\n", "t").listeners
    assert parsed.family is family


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        (
            "{interface: 127.0.0.1, port: 1, device: 'a b'}",
            "device: 'a b' is not an interface name",
        ),
        (
            "{interface: 127.0.0.1, port: 1, device: 7}",
            "device: expected an interface name, got a number (7)",
        ),
        (
            "{interface: 127.0.0.1, port: 1, responder: shout}",
            "responder: 'shout' is not one of: size, echo, discard",
        ),
        (
            "{interface: 127.0.0.1, port: 1, freebind: 'yes'}",
            "freebind: expected true or false, got a string ('yes')",
        ),
        (
            "{interface: 127.0.0.1, port: 1, required: 1}",
            "required: expected true or false, got a number (1)",
        ),
        (
            "{interface: 127.0.0.1, port: 1, enabled: null}",
            "enabled: expected true or false, got nothing (null)",
        ),
        (
            "{interface: 127.0.0.1, port: 1, name: 'a b'}",
            "name: 'a b': names must be non-empty with no spaces",
        ),
        (
            "{interface: 127.0.0.1, port: 1, name: ''}",
            "name: '': names must be non-empty with no spaces",
        ),
        ("{interface: 127.0.0.1, port: 1, name: 5}", "name: expected a string, got a number (5)"),
    ],
)
def test_other_listener_keys_rejected(listener: str, expected: str) -> None:
    assert one(listener) == [f"t.yaml:2: listeners[0].{expected}"]


def test_yaml_11_booleans_are_booleans() -> None:
    (parsed,) = parse_text(
        "listeners:\n  - {interface: 127.0.0.1, port: 1, reuse_port: yes, enabled: on}\n", "t"
    ).listeners
    assert (parsed.reuse_port, parsed.enabled) == (True, True)


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    ("listener", "name"),
    [
        ("{interface: 127.0.0.1, port: 1060}", "127.0.0.1:1060"),
        ('{interface: "::1", port: 1060}', "[::1]:1060"),
        ('{interface: "*", port: 53}', "*:53"),
        ('{interface: "*", port: 53, family: ipv6}', "*:53/ipv6"),
        ('{interface: "::", port: 53, family: dual}', "[::]:53/dual"),
        ("{interface: lo, port: 53, family: ipv4}", "lo:53/ipv4"),
        ('{interface: "*", port: 53, device: eth0}', "*:53%eth0"),
        ('{interface: "fe80::1%eth0", port: 53}', "[fe80::1%eth0]:53"),
        ('{interface: "fe80::1", port: 53, device: eth0}', "[fe80::1]:53%eth0"),
        ("{interface: 127.0.0.1, port: 53, family: ipv4}", "127.0.0.1:53"),
        ("{interface: 127.0.0.1, port: 53, name: dns}", "dns"),
    ],
)
def test_default_names(listener: str, name: str) -> None:
    (parsed,) = parse_text(f"listeners:\n  - {listener}\n", "t").listeners
    assert parsed.name == name


def test_wildcards_of_two_families_on_one_port_need_no_names() -> None:
    cfg = parse_text(
        "listeners:\n"
        '  - {interface: "*", port: 53, family: ipv4}\n'
        '  - {interface: "*", port: 53, family: ipv6}\n',
        "t",
    )
    assert [listener.name for listener in cfg.listeners] == ["*:53/ipv4", "*:53/ipv6"]


def test_same_socket_twice_without_names() -> None:
    assert text_problems(
        "listeners:\n  - {interface: 127.0.0.1, port: 53}\n  - {interface: 127.0.0.1, port: 53}\n"
    ) == [
        "t.yaml:3: listeners[1]: same default name '127.0.0.1:53' as listeners[0]: "
        "both would bind the same socket"
    ]


def test_duplicate_name_is_found_even_when_the_first_listener_is_invalid() -> None:
    assert text_problems(
        "listeners:\n"
        "  - {name: a, interface: 127.0.0.1, port: 0}\n"
        "  - {name: a, interface: 127.0.0.1, port: 1}\n"
    ) == [
        "t.yaml:2: listeners[0].port: 0 is not in 1..65535",
        "t.yaml:3: listeners[1].name: duplicate name 'a' (also listeners[0])",
    ]


def test_disabled_listeners_are_still_validated() -> None:
    assert one("{interface: 127.0.0.1, port: 0, enabled: false}") == [
        "t.yaml:2: listeners[0].port: 0 is not in 1..65535"
    ]


# ---------------------------------------------------------------------------------------------
# metrics and logging


@pytest.mark.parametrize(
    ("section", "listen"),
    [
        ("", (Endpoint("127.0.0.1", 9917),)),
        ("metrics:\n", (Endpoint("127.0.0.1", 9917),)),
        ("metrics: {}\n", (Endpoint("127.0.0.1", 9917),)),
        ("metrics:\n  listen:\n", (Endpoint("127.0.0.1", 9917),)),
        ("metrics:\n  listen: 127.0.0.1:9000\n", (Endpoint("127.0.0.1", 9000),)),
        ('metrics:\n  listen: "[::1]:9917"\n', (Endpoint("::1", 9917),)),
        ("metrics:\n  listen: []\n", ()),
        (
            'metrics:\n  listen: ["0.0.0.0:9917", "[::]:9918"]\n',
            (Endpoint("0.0.0.0", 9917), Endpoint("::", 9918)),
        ),
        (
            'metrics:\n  listen: ["[fe80::1%eth0]:9917"]\n',
            (Endpoint("fe80::1%eth0", 9917),),
        ),
    ],
)
def test_metrics_listen_accepted(section: str, listen: tuple[Endpoint, ...]) -> None:
    cfg = parse_text(f"listeners: []\n{section}", "t")
    assert cfg.metrics.listen == listen


def test_metrics_endpoint_text() -> None:
    assert [str(e) for e in (Endpoint("::1", 9917), Endpoint("127.0.0.1", 9917))] == [
        "[::1]:9917",
        "127.0.0.1:9917",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'::1:9917'", "'::1:9917' is not ADDRESS:PORT (IPv6 in brackets: [::1]:9917)"),
        ("'[127.0.0.1]:80'", "'[127.0.0.1]:80': '127.0.0.1' is not an IPv6 address"),
        ("'localhost:9917'", "'localhost:9917': 'localhost' is not an IPv4 address"),
        ("'127.0.0.1'", "'127.0.0.1' is not ADDRESS:PORT (IPv6 in brackets: [::1]:9917)"),
        ("':9917'", "':9917': '' is not an IPv4 address"),
        ("'127.0.0.1:+99'", "'127.0.0.1:+99' is not ADDRESS:PORT (IPv6 in brackets: [::1]:9917)"),
        ("'127.0.0.1:0'", "'127.0.0.1:0': port 0 is not in 1..65535"),
        ("'[::1]:65536'", "'[::1]:65536': port 65536 is not in 1..65535"),
        (
            "9917",
            'expected an address such as "127.0.0.1:9917" or "[::1]:9917", got a number (9917)',
        ),
    ],
)
def test_metrics_listen_rejected(value: str, message: str) -> None:
    assert text_problems(f"listeners: []\nmetrics:\n  listen: {value}\n") == [
        f"t.yaml:3: metrics.listen: {message}"
    ]


def test_metrics_listen_twice() -> None:
    assert text_problems(
        'listeners: []\nmetrics:\n  listen: ["127.0.0.1:9917", "127.0.0.1:9917"]\n'
    ) == ["t.yaml:3: metrics.listen[1]: 127.0.0.1:9917 is listed twice"]


def test_metrics_section_shape() -> None:
    assert text_problems("listeners: []\nmetrics: [1]\nlogging: 3\n") == [
        "t.yaml:2: metrics: expected a mapping, got a list",
        "t.yaml:3: logging: expected a mapping, got a number (3)",
    ]
    assert text_problems("listeners: []\nmetrics:\n  listne: []\n") == [
        "t.yaml:3: metrics.listne: unknown key (did you mean 'listen'?)"
    ]


def test_metrics_tls() -> None:
    cfg = parse_text(
        "listeners: []\nmetrics:\n  listen: '[::1]:9917'\n"
        "  tls: {cert: /etc/m.crt, key: /etc/m.key, client_ca: /etc/ca.crt}\n",
        "t",
    )
    assert cfg.metrics == config.MetricsConfig(
        (Endpoint("::1", 9917),), config.MetricsTLS("/etc/m.crt", "/etc/m.key", "/etc/ca.crt")
    )
    cfg = parse_text("listeners: []\nmetrics:\n  tls: {cert: /c, key: /k}\n", "t")
    assert cfg.metrics == config.MetricsConfig(
        (Endpoint("127.0.0.1", 9917),), config.MetricsTLS("/c", "/k")
    )
    assert parse_text("listeners: []\nmetrics:\n  tls:\n", "t").metrics.tls is None
    assert parse_text("listeners: []\n", "t").metrics.tls is None


def test_metrics_tls_rejected() -> None:
    assert text_problems(
        "listeners: []\nmetrics:\n  tls:\n    cert: m.crt\n    client_ca: 5\n    pem: x\n"
    ) == [
        "t.yaml:3: metrics.tls.key: required: an absolute file path",
        "t.yaml:4: metrics.tls.cert: 'm.crt' is not an absolute path",
        "t.yaml:5: metrics.tls.client_ca: expected an absolute file path, got a number (5)",
        "t.yaml:6: metrics.tls.pem: unknown key (known: cert, client_ca, key)",
    ]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("", config.LoggingConfig(LogLevel.INFO, LogFormat.AUTO)),
        ("logging:\n", config.LoggingConfig(LogLevel.INFO, LogFormat.AUTO)),
        ("logging:\n  level: WARNING\n", config.LoggingConfig(LogLevel.WARNING, LogFormat.AUTO)),
        ("logging:\n  format: console\n", config.LoggingConfig(LogLevel.INFO, LogFormat.CONSOLE)),
        (
            "logging: {level: error, format: json}\n",
            config.LoggingConfig(LogLevel.ERROR, LogFormat.JSON),
        ),
    ],
)
def test_logging_accepted(section: str, expected: config.LoggingConfig) -> None:
    assert parse_text(f"listeners: []\n{section}", "t").logging == expected


def test_logging_rejected() -> None:
    assert text_problems("listeners: []\nlogging:\n  level: 10\n  format: xml\n  colour: 1\n") == [
        "t.yaml:3: logging.level: expected one of: debug, info, warning, error, got a number (10)",
        "t.yaml:4: logging.format: 'xml' is not one of: auto, json, console",
        "t.yaml:5: logging.colour: unknown key (known: format, level)",
    ]


@pytest.mark.parametrize(
    ("section", "expected"),
    [("", IOMode.BATCHED), ("io: batched\n", IOMode.BATCHED), ("io: Plain\n", IOMode.PLAIN)],
)
def test_io_mode_accepted(section: str, expected: IOMode) -> None:
    assert parse_text(f"listeners: []\n{section}", "t").io is expected


def test_io_mode_rejected() -> None:
    assert text_problems("listeners: []\nio: fast\n") == [
        "t.yaml:2: io: 'fast' is not one of: batched, plain",
    ]
    assert text_problems("listeners: []\nio: 1\n") == [
        "t.yaml:2: io: expected one of: batched, plain, got a number (1)",
    ]


# ---------------------------------------------------------------------------------------------
# Problem rendering


def test_problem_text() -> None:
    assert (
        str(Problem("f.yaml", 3, "listeners[0].port", "bad")) == "f.yaml:3: listeners[0].port: bad"
    )
    assert str(Problem("f.yaml", 3, "", "bad")) == "f.yaml:3: bad"
    assert str(Problem("f.yaml", 0, "", "bad")) == "f.yaml: bad"


# ---------------------------------------------------------------------------------------------
# the example file documents every key


def _example_keys() -> dict[str, set[str]]:
    from udpbindd.yamlsrc import parse

    root, problems = parse(EXAMPLE.read_text(), str(EXAMPLE))
    assert problems == []
    assert root is not None
    assert isinstance(root.value, dict)
    used: dict[str, set[str]] = {"top": set(root.value), "listener": set()}
    for item in root.value["listeners"].value:
        used["listener"] |= set(item.value)
    used["metrics"] = set(root.value["metrics"].value)
    used["logging"] = set(root.value["logging"].value)
    return used


def test_example_loads() -> None:
    cfg: Config = load(EXAMPLE)
    assert [listener.name for listener in cfg.listeners] == [
        "classic",
        "classic6",
        "lossy",
        "everywhere",
        "echo-v4",
        "echo-v6",
    ]


def test_example_uses_every_key() -> None:
    used = _example_keys()
    # user: switching users needs root, so the example shows it in comments only.
    assert used["top"] == config.TOP_KEYS - {"user"}
    assert used["listener"] == config.LISTENER_KEYS
    # metrics.tls needs certificate files, so the example shows it in comments only.
    assert used["metrics"] == config.METRICS_KEYS - {"tls"}
    assert used["logging"] == config.LOGGING_KEYS


@pytest.mark.parametrize(
    "key",
    sorted(
        config.TOP_KEYS
        | config.LISTENER_KEYS
        | config.METRICS_KEYS
        | config.TLS_KEYS
        | config.LOGGING_KEYS
        | config.RATE_LIMIT_KEYS
        | config.REFLECTION_KEYS
    ),
)
def test_example_documents_every_key_in_a_comment(key: str) -> None:
    comments = "\n".join(
        line.strip() for line in EXAMPLE.read_text().splitlines() if line.lstrip().startswith("#")
    )
    assert re.search(rf"^#\s+{key}:\s+\S", comments, re.MULTILINE), key


# ---------------------------------------------------------------------------------------------
# Without libyaml: the same problems, word for word


@pytest.mark.parametrize(("name", "expected"), BAD_FILES)
def test_bad_file_without_libyaml(
    name: str, expected: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    monkeypatch.chdir(TESTDATA)
    assert problems_of(Path(name)) == expected


# ---------------------------------------------------------------------------------------------
# Reloads: reading again only the listener entries that changed gives what a full read gives

SOURCE = "r.yaml"


def outcome(text: str) -> Config | list[str]:
    """What reading the whole text gives: the configuration, or every problem."""
    try:
        return parse_text(text, SOURCE)
    except ConfigError as error:
        return [str(problem) for problem in error.problems]


def reloaded(text: str) -> Config | list[str]:
    """What load() gives for the text, reusing what it read last time where it can."""
    try:
        return config.REREADER.load(text, SOURCE)
    except ConfigError as error:
        return [str(problem) for problem in error.problems]


def flow_entry(index: int, extra: str = "") -> str:
    return f"  - {{name: l{index}, interface: 127.1.0.{index + 1}, port: 1060{extra}}}\n"


def block_entry(index: int, extra: str = "") -> str:
    lines = f"  - name: l{index}\n    interface: 127.1.0.{index + 1}\n    port: 1060\n"
    return lines + (f"    {extra.lstrip(', ')}\n" if extra else "")


def listeners_text(entries: list[str]) -> str:
    return "user: nobody\nlisteners:\n" + "".join(entries) + "metrics: {listen: []}\n"


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """No previous load to reuse, before or after the test."""
    monkeypatch.setattr(config.REREADER, "last", None)


@pytest.mark.usefixtures("fresh")
@pytest.mark.parametrize("entry", [flow_entry, block_entry])
@pytest.mark.parametrize(
    "change",
    [
        "responder",  # one listener changes
        "insert",  # a listener is added in the middle (lines after it move)
        "append",  # a listener is added at the end
        "delete",  # the first listener goes
        "comment",  # a comment inside an entry (lines after it move)
        "same",  # nothing changes
    ],
)
def test_a_reload_reads_only_what_changed(entry: Callable[..., str], change: str) -> None:
    make = entry
    entries = [make(index) for index in range(6)]
    first = listeners_text(entries)
    assert isinstance(reloaded(first), Config)
    snapshot = config.REREADER.last
    assert snapshot is not None
    edited = list(entries)
    if change == "responder":
        edited[3] = make(3, ", responder: echo")
    elif change == "insert":
        edited.insert(2, make(9))
    elif change == "append":
        edited.append(make(9))
    elif change == "delete":
        del edited[0]
    elif change == "comment":
        edited[1] += "    # why l1 is here\n"
    text = listeners_text(edited)
    reuse = config.REREADER.reuse(snapshot, text)
    assert reuse is not None
    assert reuse.config == outcome(text)
    # A listener before the change is the very object read last time.
    if change != "delete":
        assert reuse.config.listeners[0] is snapshot.config.listeners[0]


@pytest.mark.usefixtures("fresh")
@pytest.mark.parametrize(
    ("before", "after"),
    [
        # Outside the listeners: the whole file is read again.
        (
            listeners_text([flow_entry(0)]),
            listeners_text([flow_entry(0)]).replace("nobody", "root"),
        ),
        # A problem: the full read reports it, with every other problem.
        (listeners_text([flow_entry(0)]), listeners_text([flow_entry(0, ", port: 2")])),
        (listeners_text([flow_entry(0), flow_entry(1)]), listeners_text([flow_entry(0)] * 2)),
        # An anchor and its alias, a tag, a merge key.
        (
            listeners_text([flow_entry(0)]),
            listeners_text([flow_entry(0), "  - &a {interface: 127.0.0.9, port: 1}\n  - *a\n"]),
        ),
        (listeners_text([flow_entry(0)]), listeners_text([flow_entry(0), "  - !!map {port: 1}\n"])),
        (listeners_text([flow_entry(0)]), listeners_text([flow_entry(0), "  - {<<: {port: 1}}\n"])),
        # An entry left open runs into the next lines.
        (listeners_text([flow_entry(0)]), listeners_text([flow_entry(0), "  - {name: x,\n"])),
        (listeners_text([flow_entry(0)]), listeners_text(["  - {name: 'x\n", flow_entry(0)])),
        # The listeners' indentation changes.
        (listeners_text([flow_entry(0)]), listeners_text([" " + flow_entry(0)])),
        # Other line breaks than "\n".
        (listeners_text([flow_entry(0)]), listeners_text([flow_entry(0).replace("\n", "\r\n")])),
        # No listeners left.
        (listeners_text([flow_entry(0)]), listeners_text([])),
    ],
)
def test_a_reload_reads_the_whole_file_when_it_must(before: str, after: str) -> None:
    reloaded(before)
    snapshot = config.REREADER.last
    assert snapshot is not None
    assert config.REREADER.reuse(snapshot, after) is None
    assert reloaded(after) == outcome(after)


@pytest.mark.usefixtures("fresh")
@pytest.mark.parametrize(
    "text",
    [
        "listeners: [{interface: 127.0.0.1, port: 1}]\n",  # a flow sequence
        "listeners:\n  - &a {interface: 127.0.0.1, port: 1}\n",  # an anchor
        "listeners:\n  - {interface: 127.0.0.1,\nport: 1}\n",  # an entry beyond its lines
        "listeners:\n  - {interface: 127.0.0.1, port: 1}\r\n",
    ],
)
def test_nothing_is_kept_for_a_file_a_reload_cannot_reuse(text: str) -> None:
    assert isinstance(reloaded(text), Config)
    assert config.REREADER.last is None


# Lines an edit may write (indented for a list at column 2; moved to the file's column):
# entries of every shape, and lines that break entries apart or join them, so that every
# path of the reuse and of its fallback is taken.
EDIT_LINES = [
    "  - {name: a, interface: 127.0.0.1, port: 1}",
    "  - {interface: 127.0.0.2, port: 2, responder: echo}",
    "  - {interface: '*', port: 3, family: ipv4}",
    "  - {name: l1, interface: 127.0.0.3, port: 3}",
    "  - name: b\n    interface: 127.0.0.3\n    port: 4",
    "  -\n    interface: 127.0.0.4\n    port: 4",
    "  - {name: c,\n    interface: 127.0.0.5, port: 5}",
    "  - {name: d,\n# between\n    interface: 127.0.0.6, port: 6}",
    "  - {name: e,\n  interface: 127.0.0.7, port: 7}",
    "  - {name: f,\ninterface: 127.0.0.8, port: 8}",
    '  - {name: "g\n  - h", interface: 127.0.0.9, port: 9}',
    "  - {interface: 127.0.0.1, port: 1, allow: [10.0.0.0/8,\n    192.168.0.0/16]}",
    "  - name: b",
    "    interface: 127.0.0.3",
    "    port: 4",
    "    port: 5",
    "    recv_buffer: 64KiB",
    "    responder: echo",
    "  -",
    "  - interface: lo",
    "  - {interface: 127.0.0.1, port: 70000}",
    "  - &x {interface: 127.0.0.9, port: 9}",
    "  - *x",
    "  - !!map {interface: 127.0.0.8, port: 8}",
    "  - {<<: {port: 7}, interface: 127.0.0.7}",
    "  - {name: 'open",
    "    quote'}",
    "  - {name: open,",
    "    port: 6}",
    "  - |\n      text",
    "    # a comment",
    "# a comment",
    "",
    "   ",
    "  x: 1",
    "port: 1",
    "listeners:",
    "---",
    "...",
    "\t- {port: 1}",
    "   - {interface: 127.0.0.4, port: 4}",
    "- {interface: 127.0.0.5, port: 5}",
    "    - nested",
    "  - {interface: 127.0.0.6, port: 6}\r",
]


@st.composite
def configs(draw: st.DrawFn) -> tuple[str, str]:
    """A valid file, listeners in flow and block style with comments and blank lines, and
    the indentation of its list."""
    count = draw(st.integers(1, 8))
    indent = draw(st.sampled_from(["", "  ", "    "]))
    lines = [*draw(st.sampled_from([[], ["# head"], ["user: nobody"]])), "listeners:"]
    for index in range(count):
        name = f"l{index}"
        address = f"127.1.0.{index + 1}"
        style = draw(st.sampled_from(["flow", "block", "dash"]))
        if style == "flow":
            lines.append(f"{indent}- {{name: {name}, interface: {address}, port: 1060}}")
        else:
            first = f"{indent}- name: {name}" if style == "block" else f"{indent}-"
            rest = [] if style == "block" else [f"name: {name}"]
            lines += [first, *(f"{indent}  {line}" for line in rest)]
            lines += [f"{indent}  interface: {address}", f"{indent}  port: 1060"]
        lines += draw(st.sampled_from([[], ["# between"], [""], [f"{indent}  # inside"]]))
    lines += draw(st.sampled_from([[], ["metrics: {listen: []}"], ["logging:", "  level: debug"]]))
    return "\n".join(lines) + draw(st.sampled_from(["\n", ""])), indent


@st.composite
def edits(draw: st.DrawFn, text: str, indent: str) -> str:
    """``text`` with a few lines replaced, inserted or deleted."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.integers(0, len(lines)))
        what = draw(st.sampled_from(["replace", "insert", "delete", "retype", "retype", "entry"]))
        if what == "entry":
            # A valid listener, in flow or block style, most often with a name of its own.
            name = draw(st.sampled_from(["n1", "n2", "n3", "l0"]))
            written = draw(
                st.sampled_from(
                    [
                        f"- {{name: {name}, interface: 127.3.0.1, port: 1}}",
                        f"- name: {name}\n  interface: 127.3.0.2\n  port: 2",
                    ]
                )
            ).split("\n")
            lines[where:where] = [indent + line for line in written]
        elif what == "delete" and where < len(lines):
            del lines[where]
        elif what == "retype" and where < len(lines):
            # A small change inside a line: most entries stay valid.
            old = draw(st.sampled_from(["1060", "127.1.0.", "l", "name", ": ", "- "]))
            new = draw(st.sampled_from(["1061", "127.2.0.", "m", "nam", ":", "-"]))
            lines[where] = lines[where].replace(old, new, 1)
        else:
            written = draw(st.sampled_from(EDIT_LINES)).split("\n")
            written = [indent + line[2:] if line.startswith("  ") else line for line in written]
            lines[where : where + (what == "replace")] = written
    return "\n".join(lines)


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_a_reload_gives_what_a_full_read_gives(data: st.DataObject) -> None:
    saved = config.REREADER.last
    config.REREADER.last = None
    try:
        text, indent = data.draw(configs())
        assert isinstance(reloaded(text), Config), text
        for _ in range(data.draw(st.integers(1, 4))):
            text = data.draw(edits(text, indent))
            snapshot = config.REREADER.last
            expected = outcome(text)
            if snapshot is not None:
                reuse = config.REREADER.reuse(snapshot, text)
                if reuse is not None:
                    assert reuse.config == expected, text
            assert reloaded(text) == expected, text
    finally:
        config.REREADER.last = saved


def unstreamed(text: str) -> Config | list[str]:
    """What checking the whole tree after reading it gives, as the checker did before it
    checked each listener while the file was read."""
    document = yamlsrc.read(text, SOURCE)
    root, problems = document.root, document.problems
    if root is None:
        return [str(problem) for problem in ConfigError(problems).problems] or ["empty"]
    checker = config._Checker(SOURCE, problems)
    result = checker.config(root)
    if checker.problems or result is None:
        return [str(problem) for problem in ConfigError(checker.problems).problems]
    return result


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_checking_listeners_as_they_are_read_changes_nothing(data: st.DataObject) -> None:
    text, indent = data.draw(configs())
    text = data.draw(edits(text, indent))
    expected = unstreamed(text)
    if expected == ["empty"]:
        expected = [f"{SOURCE}: empty file: expected a mapping with 'listeners'"]
    assert outcome(text) == expected, text
