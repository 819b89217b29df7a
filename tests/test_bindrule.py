"""Table tests for udpbindd.bindrule: the measured truth tables and examples of the kernel's rule.

The expectations are the measurements of reference/kernel-bind-rules.md (T1-T4, §2, §7), plus
a few the kernel tests established (link- and interface-local multicast need a device; a zone on
the address overrides SO_BINDTODEVICE) and the table's own bookkeeping (remove, insert, size).
Sockets are written as keys: ``127.0.0.1``, ``[::1]v6o`` (IPV6_V6ONLY=1), ``[fe80::1%vb0]``
(zone), with suffixes ``+RA``/``+RP`` (SO_REUSEADDR/SO_REUSEPORT), ``%dev`` (SO_BINDTODEVICE)
and ``@uid`` (the socket's owner). No sockets are opened; test_bindrule_kernel.py asks the kernel.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udpbindd import bindrule
from udpbindd.bindrule import InvalidBind, PortTable, Sock, quiet_slots, validate_name
from udpbindd.names import SocketName

PORT = 5000

_KEY = re.compile(
    r"^(?:\[(?P<v6>[^\]]+)\]|(?P<v4>[\d.]+))(?P<v6o>v6o)?"
    r"(?P<flags>(?:\+RA|\+RP)*)(?:%(?P<dev>\w+))?(?:@(?P<uid>\d+))?$"
)


def sock(key: str, port: int = PORT) -> Sock:
    """The Sock a key describes, e.g. ``[::]v6o+RA+RP%lo@65534``."""
    match = _KEY.match(key)
    assert match is not None, key
    device = match["dev"] or ""
    text = match["v6"] or match["v4"]
    if "%" in text:  # a link-local zone acts as the bound device
        text, device = text.split("%")
    name = SocketName(
        address=ipaddress.ip_address(text),
        port=port,
        device=device,
        v6only=match["v6o"] is not None,
    )
    return Sock(
        name,
        reuse_addr="+RA" in match["flags"],
        reuse_port="+RP" in match["flags"],
        uid=int(match["uid"] or 0),
    )


def outcomes(*keys: str, table: PortTable | None = None) -> list[str]:
    """Bind the keys in order: ``.`` bound, ``X`` EADDRINUSE, ``EINVAL`` InvalidBind."""
    table = PortTable() if table is None else table
    results = []
    for key in keys:
        try:
            refused_by = table.bind(sock(key))
        except InvalidBind:
            results.append("EINVAL")
        else:
            results.append("." if refused_by is None else "X")
    return results


# T1, copied from the reference: row bound first, column second, same port, no options.
T1_COLUMNS = [
    "127.0.0.1",
    "127.0.0.2",
    "127.0.0.6",
    "0.0.0.0",
    "10.199.0.1",
    "[::1]",
    "[::1]v6o",
    "[::]",
    "[::]v6o",
    "[::ffff:127.0.0.1]",
    "[::ffff:127.0.0.2]",
    "[::ffff:0.0.0.0]",
    "[fd99::1]",
    "[fd99::1]v6o",
]
T1 = """
127.0.0.1           X . . X . . . X . X . X . .
127.0.0.2           . X . X . . . X . . X X . .
127.0.0.6           . . X X . . . X . . . X . .
0.0.0.0             X X X X X . . X . X X X . .
10.199.0.1          . . . X X . . X . . . X . .
[::1]               . . . . . X X X X . . . . .
[::1]v6o            . . . . . X X X X . . . . .
[::]                X X X X X X X X X X X X X X
[::]v6o             . . . . . X X X X . . . X X
[::ffff:127.0.0.1]  X . . X . . . X . X . X . .
[::ffff:127.0.0.2]  . X . X . . . X . . X X . .
[::ffff:0.0.0.0]    X X X X X . . X . X X X . .
[fd99::1]           . . . . . . . X X . . . X X
[fd99::1]v6o        . . . . . . . X X . . . X X
"""


def _parse_t1() -> dict[tuple[str, str], str]:
    cells = {}
    for line in T1.strip().splitlines():
        first, *row = line.split()
        cells.update({(first, second): cell for second, cell in zip(T1_COLUMNS, row, strict=True)})
    return cells


T1_CELLS = _parse_t1()


def test_t1_is_complete_and_symmetric() -> None:
    assert len(T1_CELLS) == 14 * 14
    for (first, second), cell in T1_CELLS.items():
        assert T1_CELLS[second, first] == cell, (first, second)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [(first, second, cell) for (first, second), cell in T1_CELLS.items()],
    ids=[f"{first}-then-{second}" for first, second in T1_CELLS],
)
def test_t1_address_overlap(first: str, second: str, expected: str) -> None:
    assert outcomes(first, second) == [".", expected]


def test_different_ports_never_clash() -> None:
    for first, second in T1_CELLS:
        table = PortTable()
        assert table.bind(sock(first, PORT)) is None
        assert table.bind(sock(second, PORT + 1)) is None, (first, second)


# T2: X where both sockets' flags still clash. Key: (RA on, RP on) as none/first/second/both.
T2 = {
    ("none", "none"): "X",
    ("none", "first"): "X",
    ("none", "second"): "X",
    ("none", "both"): ".",
    ("first", "none"): "X",
    ("first", "first"): "X",
    ("first", "second"): "X",
    ("first", "both"): ".",
    ("second", "none"): "X",
    ("second", "first"): "X",
    ("second", "second"): "X",
    ("second", "both"): ".",
    ("both", "none"): ".",
    ("both", "first"): ".",
    ("both", "second"): ".",
    ("both", "both"): ".",
}


def _flags(which: str, position: str) -> bool:
    return which in ("both", position)


@pytest.mark.parametrize(("ra", "rp"), list(T2), ids=[f"RA-{ra}_RP-{rp}" for ra, rp in T2])
def test_t2_reuse_flags_on_every_t1_pair(ra: str, rp: str) -> None:
    for (first, second), overlap in T1_CELLS.items():
        keys = []
        for key, position in ((first, "first"), (second, "second")):
            keys.append(key + "+RA" * _flags(ra, position) + "+RP" * _flags(rp, position))
        expected = "X" if overlap == "X" and T2[ra, rp] == "X" else "."
        assert outcomes(*keys) == [".", expected], keys


# T3: SO_BINDTODEVICE on both sockets, same address; "" is no device.
DEVICES = ["", "lo", "vb0", "vb1"]
T3 = {
    (first, second): "." if first and second and first != second else "X"
    for first, second in itertools.product(DEVICES, DEVICES)
}
T3_ADDRESSES = ["0.0.0.0", "127.0.0.1", "[::]", "[fd99::1]"]


def _with_device(key: str, device: str) -> str:
    return f"{key}%{device}" if device else key


@pytest.mark.parametrize("options", ["plain", "RA-both", "RP-both"])
@pytest.mark.parametrize("address", T3_ADDRESSES)
@pytest.mark.parametrize(
    ("first", "second"), list(T3), ids=[f"{a or 'none'}-then-{b or 'none'}" for a, b in T3]
)
def test_t3_devices(first: str, second: str, address: str, options: str) -> None:
    suffix = {"plain": "", "RA-both": "+RA", "RP-both": "+RP"}[options]
    keys = [_with_device(address + suffix, first), _with_device(address + suffix, second)]
    expected = T3[first, second] if options == "plain" else "."
    assert outcomes(*keys) == [".", expected]


@pytest.mark.parametrize(
    ("other", "expected"),
    [
        ("[::]v6o", "X"),
        ("[::]v6o%vb0", "X"),
        ("[::]v6o%vb1", "."),
        ("[::]v6o%lo", "."),
        ("[::]", "X"),
        ("[::]%vb1", "."),
        ("0.0.0.0", "."),
        ("[fe80::1%vb0]", "X"),
        ("[fe80::1]%vb0", "X"),
        ("[fe80::1%vb1]", "."),
        ("[fe80::1]%vb1", "."),
        ("[fe80::2%vb0]", "."),
        ("[fe80::1%vb0]+RP", "X"),
    ],
)
@pytest.mark.parametrize("order", ["link-local-first", "link-local-second"])
def test_t3_link_local_zone_acts_as_device(other: str, expected: str, order: str) -> None:
    keys = ["[fe80::1%vb0]", other]
    if order == "link-local-second":
        keys.reverse()
    assert outcomes(*keys) == [".", expected]


def test_zone_in_the_address_overrides_the_device() -> None:
    # The kernel writes sin6_scope_id over SO_BINDTODEVICE: this socket is bound to vb0.
    scoped = Sock(SocketName(ipaddress.ip_address("fe80::1%vb0"), PORT, device="vb1"))
    assert scoped.device == "vb0"
    table = PortTable()
    assert table.bind(scoped) is None
    assert table.bind(sock("[fe80::1]%vb0")) is scoped
    assert table.bind(sock("[fe80::1]%vb1")) is None


# T4: triples on one address; the IPv6 column differs because IPv6 SO_REUSEPORT sockets are
# added at the tail of the hash chain, behind the older sockets that refuse the newcomer.
T4 = [
    (("+RA", "+RA+RP", "+RP"), ". . .", ". . X"),
    (("+RA+RP", "+RA", "+RP"), ". . X", ". . X"),
    (("+RP", "+RA+RP", "+RA"), ". . X", ". . X"),
    (("+RA", "+RA", "+RA"), ". . .", ". . ."),
    (("+RP", "+RP", "+RP"), ". . .", ". . ."),
]


@pytest.mark.parametrize("address", ["127.0.0.1", "[::1]", "[::]"])
@pytest.mark.parametrize(
    ("options", "ipv4", "ipv6"), T4, ids=[",".join(o.lstrip("+") for o in t[0]) for t in T4]
)
def test_t4_triples(options: tuple[str, ...], ipv4: str, ipv6: str, address: str) -> None:
    expected = ipv4 if address == "127.0.0.1" else ipv6
    assert " ".join(outcomes(*(address + option for option in options))) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        # An older socket that would refuse is shadowed by a newer one that accepts via RP.
        (["[::]v6o", "127.0.0.1+RP", "[::]+RP"], ". . ."),
        (["127.0.0.1+RP", "[::]v6o", "[::]+RP"], ". . X"),
        (["[::]v6o", "[::]+RP"], ". X"),
        (["0.0.0.0+RP", "[::]+RP"], ". ."),
        (["[::]+RP", "0.0.0.0+RP"], ". ."),
        (["[::]v6o+RP", "0.0.0.0", "[::]+RP"], ". . X"),
        (["0.0.0.0", "[::]v6o+RP", "[::]+RP"], ". . X"),
        (["127.0.0.1+RA", "127.0.0.1+RA+RP", "127.0.0.1+RP", "127.0.0.1+RP"], ". . . ."),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_first_relevant_socket_decides(keys: list[str], expected: str) -> None:
    assert " ".join(outcomes(*keys)) == expected


SHADOW = ["0.0.0.0+RA", "127.0.0.1+RA+RP", "127.0.0.1+RP"]


def _fill_slot(table: PortTable, count: int, port: int) -> None:
    for n in range(count):
        assert table.bind(sock(f"127.0.1.{n + 1}", port)) is None


@pytest.mark.parametrize(
    ("fillers", "expected"),
    [(0, ". . ."), (8, ". . ."), (9, ". . X"), (10, ". . X"), (11, ". . X")],
    ids=lambda value: f"{value}-fillers" if isinstance(value, int) else value,
)
def test_secondary_hash_on_a_busy_slot(fillers: int, expected: str) -> None:
    # §7.2: with more than 10 sockets in the primary slot (these fillers on P+16384 plus W and S),
    # C is checked against its own address list and the wildcard list separately, and W refuses.
    table = PortTable()
    _fill_slot(table, fillers, PORT + 16384)
    assert " ".join(outcomes(*SHADOW, table=table)) == expected


def test_secondary_hash_slot_follows_hash_entries() -> None:
    table = PortTable(hash_entries=1024)
    _fill_slot(table, 10, PORT + 1024)
    assert outcomes(*SHADOW, table=table) == [".", ".", "X"]
    table = PortTable(hash_entries=1024)
    _fill_slot(table, 10, PORT + 512)  # a different slot in a 1024-entry table
    assert outcomes(*SHADOW, table=table) == [".", ".", "."]


def test_wildcard_bind_on_a_busy_slot_still_sees_specific_sockets() -> None:
    table = PortTable()
    _fill_slot(table, 12, PORT)
    assert outcomes("0.0.0.0", "[::]", "[::ffff:0.0.0.0]", "[::]v6o", table=table) == [
        "X",
        "X",
        "X",
        ".",
    ]


def test_secondary_hash_example_pairwise_refusals_still_hold() -> None:
    table = PortTable()
    _fill_slot(table, 11, PORT + 16384)
    assert outcomes("127.0.0.1", "127.0.0.1", "0.0.0.0", "[::ffff:127.0.0.1]", table=table) == [
        ".",
        "X",
        "X",
        "X",
    ]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["127.0.0.1+RP", "127.0.0.1+RP@65534"], ". X"),
        (["127.0.0.1+RP@65534", "127.0.0.1+RP"], ". X"),
        (["127.0.0.1+RP@65534", "127.0.0.1+RP@65534"], ". ."),
        (["[::]+RP", "0.0.0.0+RP@65534"], ". X"),
        (["127.0.0.1+RA", "127.0.0.1+RA@65534"], ". ."),
        (["127.0.0.1+RA+RP", "127.0.0.1+RA+RP@65534"], ". ."),
        (["127.0.0.1+RP", "127.0.0.1+RP@65534", "127.0.0.1+RP@65534"], ". X X"),
        (["[::1]+RP@65534", "[::1]+RP", "[::1]+RP@65534"], ". X ."),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else value,
)
def test_reuse_port_needs_the_same_owner(keys: list[str], expected: str) -> None:
    assert " ".join(outcomes(*keys)) == expected


@pytest.mark.parametrize(
    "key",
    [
        "[::ffff:127.0.0.1]v6o",
        "[::ffff:0.0.0.0]v6o",
        "[fe80::1]",
        "[fe80::1]v6o",
        "[fe80::1]+RA+RP",
        "[ff02::1]",
        "[ff01::1]",
        "[ff12::1:2]",
    ],
)
def test_invalid_binds(key: str) -> None:
    table = PortTable()
    with pytest.raises(InvalidBind):
        table.conflict(sock(key))
    with pytest.raises(InvalidBind):
        table.bind(sock(key))
    # A refused socket is not in the table: the same name binds afterwards.
    assert outcomes("0.0.0.0", "[::]v6o", table=table) == [".", "."]


@pytest.mark.parametrize(
    ("key", "invalid"),
    [
        ("[::ffff:127.0.0.1]v6o", True),
        ("[fe80::1]", True),
        ("[ff02::1]", True),
        ("[fe80::1]%vb0", False),
        ("[fe80::1%vb0]", False),
        ("[::ffff:127.0.0.1]", False),
        ("127.0.0.1", False),
    ],
)
def test_validate_name_needs_only_the_name(key: str, invalid: bool) -> None:
    name = sock(key).name
    if invalid:
        with pytest.raises(InvalidBind):
            validate_name(name)
    else:
        validate_name(name)


@pytest.mark.parametrize("key", ["[ff02::1]%vb0", "[ff01::1]%lo", "[ff05::1:3]", "[fe80::1]%vb0"])
def test_scoped_addresses_bind_with_a_device(key: str) -> None:
    assert outcomes(key, key) == [".", "X"]


def test_invalid_bind_is_raised_before_any_comparison() -> None:
    table = PortTable()
    assert table.bind(sock("[::]")) is None
    with pytest.raises(InvalidBind):
        table.conflict(sock("[::ffff:127.0.0.1]v6o"))


def test_conflict_names_the_refusing_socket_and_does_not_bind() -> None:
    table = PortTable()
    first = sock("0.0.0.0+RA")
    assert table.bind(first) is None
    assert table.conflict(sock("127.0.0.1")) is first
    assert table.conflict(sock("127.0.0.1")) is first
    assert table.bind(sock("127.0.0.1+RA")) is None


def test_remove_frees_the_name() -> None:
    table = PortTable()
    held = sock("0.0.0.0")
    assert table.bind(held) is None
    assert table.bind(sock("127.0.0.1")) is held
    table.remove(held)
    assert table.bind(sock("127.0.0.1")) is None
    with pytest.raises(KeyError):
        table.remove(held)


def test_remove_needs_the_bound_object() -> None:
    table = PortTable()
    assert table.bind(sock("127.0.0.1+RA")) is None
    with pytest.raises(KeyError):
        table.remove(sock("127.0.0.1+RA"))  # equal, but not the socket that was bound


def test_remove_updates_the_slot_count() -> None:
    table = PortTable()
    fillers = [sock(f"127.0.1.{n + 1}", PORT + 16384) for n in range(9)]
    for filler in fillers:
        assert table.bind(filler) is None
    table.remove(fillers[0])  # 8 fillers + W + S: C no longer sees a busy slot
    assert outcomes(*SHADOW, table=table) == [".", ".", "."]


def test_a_zone_on_the_address_changes_nothing_but_the_device() -> None:
    # Callers may pass IPv6Address("fe80::1%eth0"), which never equals IPv6Address("fe80::1").
    def scoped(text: str, device: str = "") -> Sock:
        return Sock(SocketName(ipaddress.ip_address(text), PORT, device=device))

    table = PortTable()
    assert table.bind(scoped("fe80::1%vb0")) is None
    assert table.conflict(scoped("fe80::1", "vb0")) is not None
    assert table.conflict(scoped("fd99::1%vb0")) is None
    assert table.bind(scoped("fd99::1")) is None
    assert (
        table.conflict(scoped("fd99::1%vb1")) is not None
    )  # the zone of a global address is ignored
    assert scoped("::%vb0").is_wildcard
    assert table.conflict(scoped("::%vb0")) is not None


@pytest.mark.parametrize("entries", [0, -16384, 1000])
def test_hash_entries_must_be_a_power_of_two(entries: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        PortTable(hash_entries=entries)


def test_insert_records_a_socket_without_judging_it() -> None:
    # Sockets other processes already hold are inserted as they are, clashing or not.
    table = PortTable()
    first, second = sock("0.0.0.0"), sock("0.0.0.0")
    table.insert(first)
    table.insert(second)
    assert table.conflict(sock("127.0.0.1")) is second  # the newest comes first in the chain
    table.remove(second)
    assert table.conflict(sock("127.0.0.1")) is first


@pytest.mark.parametrize("family", [4, 6])
def test_ten_thousand_addresses_on_one_port_is_linear(
    family: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every comparison of two sockets goes through `relevant`; counting its calls shows each
    # specific-address bind looks at its own address and the wildcards, not at every socket.
    calls = 0
    real_relevant = bindrule.relevant

    def counting_relevant(new: Sock, old: Sock) -> bool:
        nonlocal calls
        calls += 1
        return real_relevant(new, old)

    monkeypatch.setattr(bindrule, "relevant", counting_relevant)
    count = 10_000
    base = ipaddress.ip_address("10.0.0.1" if family == 4 else "fd00::1")
    wildcard = "0.0.0.0+RA" if family == 4 else "[::]v6o+RA"
    table = PortTable()
    assert table.bind(sock(wildcard)) is None
    for n in range(count):
        name = SocketName(base + n, PORT)
        assert table.bind(Sock(name, reuse_addr=True)) is None
    assert calls <= 2 * count
    calls = 0
    # The table still refuses: one duplicate address and one plain wildcard.
    assert table.bind(Sock(SocketName(base + count // 2, PORT))) is not None
    assert calls <= 3
    assert table.bind(sock(wildcard.replace("+RA", ""))) is not None


# ---------------------------------------------------------------- slots where nothing can clash


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["127.0.0.1:1", "127.0.0.2:1", "[::1]:1", "[fd99::1]v6o:1"], {1}),
        (["127.0.0.1:1", "127.0.0.1:5"], {1}),  # one slot of 4, but two ports
        (["127.0.0.1:1", "127.0.0.2:2", "127.0.0.2:2"], {1}),  # the same socket name twice
        (["127.0.0.1:1", "127.0.0.1%lo:1"], set()),  # another device does not tell them apart
        (["127.0.0.1:1", "[::ffff:127.0.0.1]:1"], set()),  # the kernel keys both as IPv4
        (["[fe80::1%vb0]:1", "[fe80::1]%vb1:1"], set()),  # a zone is not part of the address
        (["0.0.0.0:1", "127.0.0.1:5"], set()),  # a wildcard anywhere in the slot
        (["[::]v6o:1", "127.0.0.1:2"], {2}),
        (["[::ffff:0.0.0.0]:3"], set()),
    ],
)
def test_quiet_slots(keys: list[str], expected: set[int]) -> None:
    names = []
    for key in keys:
        text, port = key.rsplit(":", 1)
        names.append(sock(text, int(port)).name)
    assert quiet_slots(names, hash_entries=4) == expected


QUIET_ADDRESSES = ["127.0.0.1", "127.0.0.2", "0.0.0.0", "[::ffff:127.0.0.1]", "[::ffff:0.0.0.0]"]
QUIET_ADDRESSES += ["[::1]", "[::]", "[fd99::1]", "[fe80::1%vb0]", "[fe80::1]"]


@st.composite
def slot_cases(draw: st.DrawFn) -> tuple[int, list[Sock]]:
    """A small hash table and sockets on a few of its ports, so that slots are shared."""
    hash_entries = draw(st.sampled_from([1, 2, 4]))
    keys = st.tuples(
        st.sampled_from(QUIET_ADDRESSES),
        st.sampled_from(["", "v6o"]),
        st.sampled_from(["", "+RA", "+RP", "+RA+RP"]),
        st.sampled_from(["", "%vb0", "%vb1"]),
        st.sampled_from(["", "@65534"]),
        st.integers(1, 6),
    )
    made = []
    for address, v6only, flags, device, uid, port in draw(st.lists(keys, max_size=24)):
        v6o = v6only if address.startswith("[") else ""
        made.append(sock(address + v6o + flags + device + uid, port))
    return hash_entries, made


def _results(socks: list[Sock], hash_entries: int) -> list[str]:
    table = PortTable(hash_entries)
    results = []
    for s in socks:
        try:
            results.append("." if table.bind(s) is None else "X")
        except InvalidBind:
            results.append("EINVAL")
    return results


def test_quiet_slots_refuse_nothing_and_affect_nothing() -> None:
    # What clash.check relies on to pass over quiet slots without a PortTable.
    stats: Counter[str] = Counter()

    @settings(max_examples=1500, deadline=None, derandomize=True, database=None)
    @given(case=slot_cases())
    def check(case: tuple[int, list[Sock]]) -> None:
        hash_entries, socks = case
        quiet = quiet_slots([s.name for s in socks], hash_entries)
        in_quiet = [s.name.port % hash_entries in quiet for s in socks]
        everything = _results(socks, hash_entries)
        for results in (everything, _results(socks[::-1], hash_entries)[::-1]):
            assert all(r != "X" for r, q in zip(results, in_quiet, strict=True) if q)
        rest = _results([s for s, q in zip(socks, in_quiet, strict=True) if not q], hash_entries)
        assert rest == [r for r, q in zip(everything, in_quiet, strict=True) if not q]
        stats["quiet sockets"] += sum(in_quiet)
        stats["refused beside a quiet slot"] += quiet != set() and "X" in everything

    check()
    # The cases really exercise both sides (bounds loose enough for any Hypothesis version).
    assert stats["quiet sockets"] > 300
    assert stats["refused beside a quiet slot"] > 30
