"""The clash check over listeners and foreign sockets: verdicts, certainty and explanations."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpbindd import clash as clash_module
from udpbindd.bindrule import InvalidBind, quiet_slots
from udpbindd.clash import Clash, Overlap, check
from udpbindd.config import parse_text
from udpbindd.expand import Binding, expand_all
from udpbindd.host import HeldSocket, Owner
from udpbindd.names import SocketName

IFACES = {
    "lo": (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")),
    "eth0": (ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("fe80::1")),
}


def bindings(yaml_listeners: str) -> list[Binding]:
    config = parse_text(f"listeners:\n{yaml_listeners}", "test.yaml")
    return list(expand_all(config.listeners, IFACES).bindings)


def held(address: str, port: int, *, uid: int = 0, exact: bool = True, v6only: bool = False,
         device: str = "", pid: int | None = 4242) -> HeldSocket:  # fmt: skip
    owner = Owner(pid, "otherd") if pid is not None else None
    name = SocketName(ipaddress.ip_address(address), port, device, v6only)
    return HeldSocket(name=name, uid=uid, inode=1000 + port, drops=0, exact=exact, owner=owner)


def only(clashes: list[Clash]) -> Clash:
    assert len(clashes) == 1, [str(c) for c in clashes]
    return clashes[0]


@pytest.mark.parametrize(
    ("listeners", "overlap", "failing", "other"),
    [
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: b, interface: '*', port: 53}\n",
            Overlap.NEW_COVERS,
            "0.0.0.0:53",
            "127.0.0.1:53",
            id="wildcard-after-specific",
        ),
        pytest.param(
            "  - {name: b, interface: '*', port: 53, family: ipv4}\n"
            "  - {name: a, interface: 127.0.0.1, port: 53}\n",
            Overlap.OLD_COVERS,
            "127.0.0.1:53",
            "0.0.0.0:53",
            id="specific-after-wildcard",
        ),
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: d, interface: '*', port: 53, family: dual}\n",
            Overlap.NEW_DUAL,
            "[::]:53",
            "127.0.0.1:53",
            id="dual-stack-covers-ipv4",
        ),
        pytest.param(
            "  - {name: d, interface: '::', port: 53, family: dual}\n"
            "  - {name: a, interface: 127.0.0.1, port: 53}\n",
            Overlap.OLD_DUAL,
            "127.0.0.1:53",
            "[::]:53",
            id="ipv4-after-dual-stack",
        ),
        pytest.param(
            "  - {name: d, interface: '*', port: 53, family: dual}\n"
            "  - {name: s, interface: '::', port: 53}\n",
            Overlap.BOTH_ANY,
            "[::]:53",
            "[::]:53",
            id="two-any-sockets",
        ),
        pytest.param(
            "  - {name: a, interface: '::1', port: 53}\n"
            "  - {name: w, interface: '*', port: 53, family: ipv6}\n",
            Overlap.NEW_COVERS,
            "[::]:53",
            "[::1]:53",
            id="ipv6-wildcard",
        ),
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: m, interface: '::ffff:127.0.0.1', port: 53}\n",
            Overlap.SAME_ADDRESS,
            "[::ffff:127.0.0.1]:53",
            "127.0.0.1:53",
            id="v4-mapped",
        ),
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: b, interface: 127.0.0.1, port: 53}\n",
            Overlap.SAME,
            "127.0.0.1:53",
            "127.0.0.1:53",
            id="exact-duplicate",
        ),
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53, reuse_port: true}\n"
            "  - {name: b, interface: 127.0.0.1, port: 53, reuse_port: true}\n",
            Overlap.SAME,
            "127.0.0.1:53",
            "127.0.0.1:53",
            id="duplicate-even-with-reuse-port",
        ),
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53, device: eth0}\n"
            "  - {name: b, interface: '*', port: 53, family: ipv4}\n",
            Overlap.NEW_COVERS,
            "0.0.0.0:53",
            "127.0.0.1:53%eth0",
            id="unbound-covers-device",
        ),
    ],
)
def test_clash_inside_the_file(listeners: str, overlap: Overlap, failing: str, other: str) -> None:
    clash = only(check(bindings(listeners)))
    assert clash.overlap is overlap
    assert str(clash.binding.name) == failing
    assert str(clash.other_name) == other
    assert clash.certain
    text = str(clash)
    assert failing in text
    assert "Fix:" in text


@pytest.mark.parametrize(
    "listeners",
    [
        pytest.param(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: b, interface: 192.0.2.10, port: 53}\n",
            id="two-specific-addresses",
        ),
        pytest.param(
            "  - {name: a, interface: '*', port: 53}\n",
            id="star-is-v4-and-v6only",
        ),
        pytest.param(
            "  - {name: a, interface: '*', port: 53, device: lo}\n"
            "  - {name: b, interface: '*', port: 53, device: eth0}\n",
            id="different-devices",
        ),
        pytest.param(
            "  - {name: a, interface: 0.0.0.0, port: 53, reuse_port: true}\n"
            "  - {name: b, interface: 127.0.0.1, port: 53, reuse_port: true}\n",
            id="reuse-port-group-same-owner",
        ),
        pytest.param(
            "  - {name: a, interface: '*', port: 53}\n  - {name: b, interface: '*', port: 54}\n",
            id="different-ports",
        ),
        pytest.param(
            "  - {name: a, interface: eth0, port: 53}\n  - {name: b, interface: lo, port: 53}\n",
            id="interfaces-incl-link-local",
        ),
    ],
)
def test_no_clash(listeners: str) -> None:
    assert check(bindings(listeners)) == []


def test_a_refused_binding_is_not_bound_so_it_causes_nothing_more() -> None:
    found = check(
        bindings(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: w, interface: 0.0.0.0, port: 53}\n"
            "  - {name: b, interface: 127.0.0.2, port: 53}\n"
        )
    )
    # 'w' fails against 'a' and is never bound, so 127.0.0.2 is free, as at run time.
    assert [(c.binding.listener.name, c.other.listener.name) for c in found] == [("w", "a")]  # type: ignore[union-attr]


def test_every_clash_is_reported_not_just_the_first() -> None:
    found = check(
        bindings(
            "  - {name: a, interface: 127.0.0.1, port: 53}\n"
            "  - {name: b, interface: 0.0.0.0, port: 53}\n"
            "  - {name: c, interface: '::1', port: 54}\n"
            "  - {name: d, interface: '::', port: 54, family: dual}\n"
        )
    )
    assert [c.binding.listener.name for c in found] == ["b", "d"]


def test_foreign_socket_names_the_process_and_is_certain_without_reuse_port() -> None:
    clash = only(check(bindings("  - {name: w, interface: '*', port: 53, family: ipv4}\n"),
                       [held("127.0.0.53", 53, uid=102)], uid=0))  # fmt: skip
    assert clash.certain
    assert "pid 4242 (otherd)" in clash.headline
    assert "stop pid 4242 (otherd)" in clash.fix


def test_foreign_socket_with_reuse_port_and_same_uid_is_only_assumed() -> None:
    listeners = "  - {name: a, interface: 127.0.0.1, port: 53, reuse_port: true}\n"
    same_uid = only(check(bindings(listeners), [held("127.0.0.1", 53, uid=1000)], uid=1000))
    assert not same_uid.certain
    assert "does not show whether the other process set SO_REUSEPORT" in same_uid.why
    other_uid = only(check(bindings(listeners), [held("127.0.0.1", 53, uid=0)], uid=1000))
    assert other_uid.certain
    assert "uid 0" in other_uid.why


def test_foreign_dual_stack_from_proc_is_assumed_worst() -> None:
    listeners = "  - {name: a, interface: 127.0.0.1, port: 53}\n"
    # /proc cannot show V6ONLY: a '::' socket is assumed dual-stack, and said to be assumed.
    clash = only(check(bindings(listeners), [held("::", 53, exact=False)]))
    assert not clash.certain
    # sock_diag showed V6ONLY=1: no clash at all.
    assert check(bindings(listeners), [held("::", 53, exact=True, v6only=True)]) == []


def test_unknown_owner() -> None:
    clash = only(check(bindings("  - {name: a, interface: 127.0.0.1, port: 53}\n"),
                       [held("0.0.0.0", 53, uid=7, pid=None)]))  # fmt: skip
    assert "unknown process (uid 7)" in clash.headline


def test_ten_thousand_listeners_on_one_port() -> None:
    lines = "".join(
        f"  - {{interface: 127.{i // 250}.{i % 250}.1, port: 53}}\n" for i in range(10_000)
    )
    found = check(bindings(lines + "  - {name: wild, interface: 0.0.0.0, port: 53}\n"))
    assert [c.binding.listener.name for c in found] == ["wild"]
    assert str(found[0].other_name) == "127.39.249.1:53"  # the newest socket decides


def test_ten_thousand_ports_and_an_invalid_binding_in_a_quiet_slot() -> None:
    lines = "".join(f"  - {{interface: 127.0.0.1, port: {1024 + i}}}\n" for i in range(10_000))
    found = bindings(lines)
    assert check(found) == []
    # A slot where nothing can clash is still validated, in order: the first invalid one raises.
    listener = found[0].listener
    unzoned = SocketName(ipaddress.ip_address("fe80::1"), 1, "", v6only=True)
    mapped = SocketName(ipaddress.ip_address("::ffff:127.0.0.1"), 2, "", v6only=True)
    invalid = [Binding(listener, unzoned), Binding(listener, mapped)]
    with pytest.raises(InvalidBind, match="link-scoped"):
        check([*found, *invalid])
    with pytest.raises(InvalidBind, match="v4-mapped"):
        check([*found, *invalid[::-1]])


NAMES = ["127.0.0.1", "127.0.0.2", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1", "fe80::1%eth0"]


@st.composite
def names(draw: st.DrawFn) -> SocketName:
    address = ipaddress.ip_address(draw(st.sampled_from(NAMES)))
    v6only = address.version == 6 and address.ipv4_mapped is None and draw(st.booleans())
    device = draw(st.sampled_from(["", "", "lo", "eth0"]))
    return SocketName(address, draw(st.integers(1, 6)), device, v6only)


@st.composite
def clash_cases(draw: st.DrawFn) -> tuple[list[Binding], list[HeldSocket], int]:
    """Bindings and foreign sockets on a few ports of a small hash table, so slots are shared."""
    [plain] = bindings("  - {name: p, interface: 127.0.0.1, port: 1}\n")
    made = []
    for index, name in enumerate(draw(st.lists(names(), max_size=16))):
        reuse_port = draw(st.booleans())
        listener = dataclasses.replace(plain.listener, name=f"l{index}", reuse_port=reuse_port)
        made.append(Binding(listener, name))
    foreign = [
        HeldSocket(
            name,
            uid=draw(st.sampled_from([0, 7])),
            inode=900 + index,
            drops=0,
            exact=draw(st.booleans()),
        )
        for index, name in enumerate(draw(st.lists(names(), max_size=4)))
    ]
    return made, foreign, draw(st.sampled_from([1, 2, 4, 16384]))


def _verdict(made: list[Binding], foreign: list[HeldSocket], entries: int) -> list[Clash] | str:
    try:
        return check(made, foreign, hash_entries=entries)
    except InvalidBind as error:
        return str(error)


def test_passing_over_quiet_slots_changes_no_verdict() -> None:
    stats: Counter[str] = Counter()

    @settings(max_examples=1500, deadline=None, derandomize=True, database=None)
    @given(case=clash_cases())
    def compare(case: tuple[list[Binding], list[HeldSocket], int]) -> None:
        made, foreign, entries = case
        fast = _verdict(made, foreign, entries)
        with pytest.MonkeyPatch.context() as patch:
            # Every slot through the PortTable, as if none were quiet.
            patch.setattr(clash_module, "quiet_slots", lambda *_args: set())
            full = _verdict(made, foreign, entries)
        assert fast == full
        stats["clashes"] += len(full) if isinstance(full, list) else 0
        quiet = quiet_slots([b.name for b in made], entries)
        stats["cases with a quiet slot"] += bool(quiet)

    compare()
    # The cases really exercise both sides (bounds loose enough for any Hypothesis version).
    assert stats["clashes"] > 300
    assert stats["cases with a quiet slot"] > 100
