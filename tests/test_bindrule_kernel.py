"""Differential tests: udpbindd.bindrule's answers against the running kernel's bind().

The kernel is the oracle. tests/bindworker.py runs inside a private network namespace and binds
each case's sockets in order, options set before bind(); the model (PortTable) must predict the
same result for every socket: ok, EADDRINUSE, or EINVAL where it raises InvalidBind. Every case
uses fresh ports, so cases never see each other's sockets.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns import Veth, Worker, WorkerError, namespace, require_netns
from test_bindrule import sock

from udpbindd.bindrule import (
    InvalidBind,
    PortTable,
    Sock,
    accepts,
    quiet_slots,
    relevant,
    validate,
)
from udpbindd.names import SocketName

pytestmark = [pytest.mark.netns, pytest.mark.slow]

WORKER = Path(__file__).with_name("bindworker.py")
VETHS = [
    Veth("vb0", "vb1", ["10.199.0.1/24", "fd99::1/64", "fe80::1/64"], ["10.199.1.1/24"]),
    Veth("vb2", "vb3", up=False),
]
ALL_DEVICES = ("", "lo", "vb0", "vb1")
# The devices each address is generated with. Excluded pairs fail with EADDRNOTAVAIL, which
# the model does not predict: ::1 is host-scoped (only lo carries it), and an unzoned fe80::1
# exists only on vb0. A zone overrides SO_BINDTODEVICE, so fe80::1%vb0 takes any device.
ADDRESS_DEVICES = {
    "127.0.0.1": ALL_DEVICES,
    "127.0.0.2": ALL_DEVICES,
    "0.0.0.0": ALL_DEVICES,
    "10.199.0.1": ALL_DEVICES,
    "::1": ("", "lo"),
    "::": ALL_DEVICES,
    "::ffff:127.0.0.1": ALL_DEVICES,
    "::ffff:0.0.0.0": ALL_DEVICES,
    "fd99::1": ALL_DEVICES,
    "fe80::1%vb0": ALL_DEVICES,
    "fe80::1": ("", "vb0"),
}
UIDS = (0, 65534)
FLAGS = ("-", "RA", "RP", "RA+RP")  # SO_REUSEADDR and SO_REUSEPORT set before bind
# Examples per property test; raise it for a longer hunt (reproducible: generation is seeded).
EXAMPLES = int(os.environ.get("BINDRULE_KERNEL_EXAMPLES", "3000"))
# Ports for the cases: below the ephemeral range, with room for the busy-slot fillers at
# port + udp_hash_entries, which must stay below 65536.
FIRST_PORT = 20000
LAST_PORT = 32000


class Kernel:
    """The worker in the test namespace, with a fresh-port source and the table geometry."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # In a child namespace the value is negative when the table is shared with the host.
        reply = worker.request({"sysctl": "net.ipv4.udp_hash_entries"})
        self.hash_entries = abs(int(reply["value"]))
        self._ports = itertools.cycle(range(FIRST_PORT, LAST_PORT, 2))

    def fresh_port(self) -> int:
        """A base port; the case may also use base + 1 and base + hash_entries."""
        return next(self._ports)

    def bind(self, events: Sequence[Sock | Close]) -> list[str]:
        """Bind (or close) in order in the namespace; the kernel's result for each event."""
        reply = self.worker.request([request(event) for event in events])
        assert "error" not in reply, reply["error"]
        results: list[str] = reply["results"]
        return results


@dataclasses.dataclass(frozen=True)
class Close:
    """Close the socket of event ``index`` of the same case (if it bound)."""

    index: int


def request(s: Sock | Close) -> dict[str, object]:
    """The worker's spec for a Sock: the address keeps its zone, the device is SO_BINDTODEVICE."""
    if isinstance(s, Close):
        return {"close": s.index}
    name = s.name
    return {
        "family": name.address.version,
        "address": str(name.address),
        "port": name.port,
        "v6only": name.v6only,
        "device": name.device,
        "reuse_addr": s.reuse_addr,
        "reuse_port": s.reuse_port,
        "uid": s.uid,
    }


def key(s: Sock) -> str:
    """A readable label for failure messages: [::]v6o:20000+RA+RP%lo@65534."""
    name = s.name
    text = f"[{name.address}]" if name.address.version == 6 else str(name.address)
    text += "v6o" if name.v6only else ""
    text += f":{name.port}" + "+RA" * s.reuse_addr + "+RP" * s.reuse_port
    text += f"%{name.device}" if name.device else ""
    return text + (f"@{s.uid}" if s.uid else "")


def predict(events: Sequence[Sock | Close], table: PortTable) -> list[str]:
    """The model's answer for binding (or closing) ``events`` in order into ``table``."""
    results = []
    bound: dict[int, Sock] = {}
    for index, event in enumerate(events):
        if isinstance(event, Close):
            target = bound.pop(event.index, None)
            if target is not None:
                table.remove(target)
            results.append("not-open" if target is None else "closed")
            continue
        try:
            refused_by = table.bind(event)
        except InvalidBind:
            results.append("EINVAL")
            continue
        if refused_by is None:
            bound[index] = event
        results.append("ok" if refused_by is None else "EADDRINUSE")
    return results


def predict_pairwise(socks: Sequence[Sock]) -> list[str]:
    """The naive rule: every bound socket must accept the newcomer.

    Used to count the cases that only the ordered first-relevant-socket rule gets right.
    """
    bound: list[Sock] = []
    results = []
    for new in socks:
        try:
            validate(new)
        except InvalidBind:
            results.append("EINVAL")
            continue
        if any(
            old.name.port == new.name.port and relevant(new, old) and not accepts(new, old)
            for old in bound
        ):
            results.append("EADDRINUSE")
        else:
            bound.append(new)
            results.append("ok")
    return results


def at_port(s: Sock, base: int) -> Sock:
    """``s`` moved from its port offset to ``base`` + offset."""
    return dataclasses.replace(s, name=dataclasses.replace(s.name, port=base + s.name.port))


@st.composite
def socks(
    draw: st.DrawFn,
    *,
    ports: int = 1,
    addresses: Sequence[str] = tuple(ADDRESS_DEVICES),
    devices: Sequence[str] = ALL_DEVICES,
    uids: Sequence[int] = UIDS,
    flags: Sequence[str] = FLAGS,
) -> Sock:
    """One socket whose port is an offset (0 .. ports - 1) from the case's base port."""
    address = draw(st.sampled_from(addresses))
    parsed = ipaddress.ip_address(address)
    allowed = [d for d in devices if d in ADDRESS_DEVICES.get(address, ALL_DEVICES)]
    name = SocketName(
        address=parsed,
        port=draw(st.integers(0, ports - 1)),
        device=draw(st.sampled_from(allowed or [""])),
        v6only=parsed.version == 6 and draw(st.booleans()),
    )
    chosen = draw(st.sampled_from(flags))
    return Sock(
        name,
        reuse_addr="RA" in chosen,
        reuse_port="RP" in chosen,
        uid=draw(st.sampled_from(uids)),
    )


def _pool(choices: Sequence[str] | Sequence[int], most: int) -> st.SearchStrategy[list[object]]:
    return st.lists(st.sampled_from(choices), min_size=1, max_size=most, unique=True)


@st.composite
def cases(
    draw: st.DrawFn,
    *,
    ports: int = 2,
    shadow: bool | None = None,
    addresses: st.SearchStrategy[list[str]] | None = None,
) -> list[Sock]:
    """2-5 sockets drawn from a few addresses, devices, owners and flag sets, so that sockets
    meet often.

    With ``shadow`` (by default, half of the cases) 1-3 sockets without SO_REUSEPORT are
    followed by two SO_REUSEPORT sockets of one owner: a newcomer that the newer of them may
    accept while an older socket would refuse it. Only there does the order of the kernel's
    hash chain decide; uniform cases almost never get there.
    """
    pools = {
        "addresses": draw(_pool(tuple(ADDRESS_DEVICES), 3) if addresses is None else addresses),
        "devices": draw(_pool(ALL_DEVICES, 2)),
        "ports": draw(st.integers(1, ports)),
    }
    uids = draw(_pool(UIDS, 2))
    if shadow if shadow is not None else draw(st.booleans()):
        uid = draw(st.sampled_from(uids))
        older = socks(**pools, uids=uids, flags=draw(_pool(FLAGS[:2], 2)))
        return [
            *draw(st.lists(older, min_size=1, max_size=3)),
            draw(socks(**pools, uids=[uid], flags=["RP", "RA+RP"])),
            draw(socks(**pools, uids=[uid], flags=["RP"])),
        ]
    strategy = socks(**pools, uids=uids, flags=draw(_pool(FLAGS, 3)))
    return draw(st.lists(strategy, min_size=2, max_size=5))


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    """One namespace and one worker for the whole module; cases are kept apart by port."""
    require_netns()
    with namespace(VETHS) as ns, Worker(ns, WORKER) as worker:
        yield Kernel(worker)


def test_model_matches_kernel(kernel: Kernel) -> None:
    stats: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=cases())
    def check(case: list[Sock]) -> None:
        base = kernel.fresh_port()
        placed = [at_port(s, base) for s in case]
        expected = predict(placed, PortTable(kernel.hash_entries))
        actual = kernel.bind(placed)
        assert actual == expected, f"{[key(s) for s in placed]}: kernel {actual}, model {expected}"
        stats["cases"] += 1
        stats.update(actual)
        if predict_pairwise(placed) != expected:
            stats["cases only the ordered rule gets right"] += 1

    check()
    print(f"\nmodel agreed with the kernel on every bind: {dict(stats)}")
    # The cases must exercise every outcome and the order-dependent part of the rule.
    assert stats["ok"] > 1000
    assert stats["EADDRINUSE"] > 1000
    assert stats["EINVAL"] > 50
    assert stats["cases only the ordered rule gets right"] > 10


@st.composite
def cases_with_closes(draw: st.DrawFn) -> list[Sock | Close]:
    """A case with some of its sockets closed along the way, each after it was bound."""
    events: list[Sock | Close] = []
    for s in draw(cases()):
        events.append(s)
        if len(events) > 1 and draw(st.integers(0, 2)) == 0:
            events.append(Close(draw(st.integers(0, len(events) - 1))))
    return events


def test_model_matches_kernel_when_sockets_close(kernel: Kernel) -> None:
    """PortTable.remove against close(): the rest of the hash chain keeps its order."""
    stats: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES // 2,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=cases_with_closes())
    def check(case: list[Sock | Close]) -> None:
        base = kernel.fresh_port()
        placed = [e if isinstance(e, Close) else at_port(e, base) for e in case]
        expected = predict(placed, PortTable(kernel.hash_entries))
        actual = kernel.bind(placed)
        labels = [f"close #{e.index}" if isinstance(e, Close) else key(e) for e in placed]
        assert actual == expected, f"{labels}: kernel {actual}, model {expected}"
        stats["cases"] += 1
        stats.update(actual)

    check()
    print(f"\nmodel agreed with the kernel on every bind and close: {dict(stats)}")
    assert stats["closed"] > 100


# Sockets put on port + udp_hash_entries before a busy-slot case. Up to 10 sockets in the
# slot, a bind takes the primary path; the case's own sockets push 6-10 fillers over the line.
FILLER_COUNTS = (11, 10, 9, 8, 7, 6, 0)
WILDCARDS = ("0.0.0.0", "::", "::ffff:0.0.0.0")
IPV4_SPECIFIC = ("127.0.0.1", "127.0.0.2", "10.199.0.1")


@st.composite
def split_cases(draw: st.DrawFn) -> list[Sock]:
    """A wildcard W and an IPv4 S in either order, then N with SO_REUSEPORT on S's address
    (as IPv4 or v4-mapped IPv6).

    On a busy slot the kernel asks S's address list and the wildcard list separately, so W can
    refuse N even when S, ahead of it in the primary chain, would accept N. S is IPv4 because
    an IPv6 SO_REUSEPORT socket sits at the chain tail, behind W, where it shadows nothing.
    """
    specific = draw(st.sampled_from(IPV4_SPECIFIC))
    devices = draw(_pool(ALL_DEVICES, 2))
    uid = draw(st.sampled_from(UIDS))
    other_uids = [other for other in UIDS if other != uid]
    older = [
        # W must refuse N: no SO_REUSEPORT, or another owner.
        draw(
            st.one_of(
                socks(addresses=WILDCARDS, devices=devices, flags=["RA", "-"]),
                socks(addresses=WILDCARDS, devices=devices, flags=["RP"], uids=other_uids),
            )
        ),
        draw(socks(addresses=[specific], devices=devices, flags=["RA+RP", "RP"], uids=[uid])),
    ]
    twins = [specific, f"::ffff:{specific}"]
    newcomer = draw(socks(addresses=twins, devices=devices, flags=["RP"], uids=[uid]))
    return [*draw(st.permutations(older)), newcomer]


@st.composite
def busy_slot_cases(draw: st.DrawFn) -> tuple[int, list[Sock]]:
    """A filler count and a case: half general, half shaped like the split example."""
    case = draw(st.one_of(split_cases(), cases(ports=1)))
    return draw(st.sampled_from(FILLER_COUNTS)), case


def _require_slot_sharing(kernel: Kernel) -> None:
    if LAST_PORT + kernel.hash_entries > 65535:
        pytest.skip(f"with {kernel.hash_entries} hash entries no other port shares a slot")


def test_model_matches_kernel_on_a_busy_slot(kernel: Kernel) -> None:
    """Fillers on port + udp_hash_entries share the case's primary hash slot; past 10 sockets
    the kernel checks specific-address binds through the secondary (address, port) hash."""
    _require_slot_sharing(kernel)
    stats: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES // 2,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=busy_slot_cases())
    def check(case: tuple[int, list[Sock]]) -> None:
        count, templates = case
        base = kernel.fresh_port()
        fillers = [
            Sock(SocketName(ipaddress.ip_address(f"127.0.1.{n + 1}"), base + kernel.hash_entries))
            for n in range(count)
        ]
        placed = [at_port(s, base) for s in templates]
        expected = predict(fillers + placed, PortTable(kernel.hash_entries))
        actual = kernel.bind(fillers + placed)
        assert actual == expected, (
            f"{count} fillers, {[key(s) for s in placed]}: "
            f"kernel {actual[count:]}, model {expected[count:]}"
        )
        stats["cases"] += 1
        if expected[count:] != predict(placed, PortTable(kernel.hash_entries)):
            stats["cases the busy slot changed"] += 1

    check()
    print(f"\nmodel agreed with the kernel on every busy-slot case: {dict(stats)}")
    assert stats["cases the busy slot changed"] > 10


# The specific addresses of ADDRESS_DEVICES, grouped by the address the kernel hashes them by:
# a quiet slot has at most one of each group per port.
SAME_KEY = (
    ("127.0.0.1", "::ffff:127.0.0.1"),
    ("127.0.0.2",),
    ("10.199.0.1",),
    ("::1",),
    ("fd99::1",),
    ("fe80::1%vb0", "fe80::1"),
)


@st.composite
def quiet_cases(draw: st.DrawFn) -> list[Sock]:
    """Sockets on two ports, each with its own specific address there, in any order."""
    made = []
    for offset in (0, 1):
        groups = draw(st.lists(st.sampled_from(SAME_KEY), unique=True, max_size=len(SAME_KEY)))
        for group in groups:
            s = draw(socks(addresses=[draw(st.sampled_from(group))]))
            made.append(dataclasses.replace(s, name=dataclasses.replace(s.name, port=offset)))
    return draw(st.permutations(made))


def test_quiet_slots_bind_everything_on_the_kernel(kernel: Kernel) -> None:
    """What quiet_slots promises (and clash.check relies on): no EADDRINUSE in such a slot,
    whatever the order, options, owners, devices, and fillers making the slot busy."""
    sharing = LAST_PORT + kernel.hash_entries <= 65535
    stats: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES // 4,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(case=quiet_cases(), count=st.sampled_from(FILLER_COUNTS if sharing else (0,)))
    def check(case: list[Sock], count: int) -> None:
        base = kernel.fresh_port()
        fillers = [
            Sock(SocketName(ipaddress.ip_address(f"127.0.1.{n + 1}"), base + kernel.hash_entries))
            for n in range(count)
        ]
        events = fillers + [at_port(s, base) for s in case]
        slots = {e.name.port % kernel.hash_entries for e in events}
        assert quiet_slots([e.name for e in events], kernel.hash_entries) == slots
        actual = kernel.bind(events)
        assert "EADDRINUSE" not in actual, f"{[key(e) for e in events]}: kernel {actual}"
        assert actual == predict(events, PortTable(kernel.hash_entries))
        stats.update(actual[count:])

    check()
    print(f"\nkernel bound every socket of every quiet slot: {dict(stats)}")
    assert stats["ok"] > 1000


DOCUMENTED = [
    # T4 (kernel-bind-rules.md §1): IPv6 SO_REUSEPORT sockets sit at the chain tail.
    (["127.0.0.1+RA", "127.0.0.1+RA+RP", "127.0.0.1+RP"], "ok ok ok"),
    (["[::1]+RA", "[::1]+RA+RP", "[::1]+RP"], "ok ok EADDRINUSE"),
    (["[::]+RA", "[::]+RA+RP", "[::]+RP"], "ok ok EADDRINUSE"),
    (["127.0.0.1+RA+RP", "127.0.0.1+RA", "127.0.0.1+RP"], "ok ok EADDRINUSE"),
    (["[::1]+RP", "[::1]+RA+RP", "[::1]+RA"], "ok ok EADDRINUSE"),
    # §1: a dual-stack [::] shadowed by an IPv4 SO_REUSEPORT socket.
    (["[::]v6o", "127.0.0.1+RP", "[::]+RP"], "ok ok ok"),
    # §2: SO_REUSEPORT needs the same owner; SO_REUSEADDR does not.
    (["127.0.0.1+RP", "127.0.0.1+RP@65534"], "ok EADDRINUSE"),
    (["127.0.0.1+RP@65534", "127.0.0.1+RP"], "ok EADDRINUSE"),
    (["127.0.0.1+RP@65534", "127.0.0.1+RP@65534"], "ok ok"),
    (["127.0.0.1+RA", "127.0.0.1+RA@65534"], "ok ok"),
    (["0.0.0.0+RP", "[::]+RP"], "ok ok"),
    # §1 T3: a link-local zone is the bound device.
    (["[fe80::1%vb0]", "[::]v6o"], "ok EADDRINUSE"),
    (["[fe80::1%vb0]", "[::]v6o%vb0"], "ok EADDRINUSE"),
    (["[fe80::1%vb0]", "[::]v6o%vb1"], "ok ok"),
    # §2 step 0: refused before any comparison.
    (["[::ffff:127.0.0.1]v6o"], "EINVAL"),
    (["[fe80::1]"], "EINVAL"),
    # Not in the reference: link- and interface-local multicast need a device too.
    (["[ff02::1]"], "EINVAL"),
    (["[ff01::1]"], "EINVAL"),
    (["[ff02::1]%vb0", "[ff02::1]%vb0"], "ok EADDRINUSE"),
    (["[ff05::1:3]", "[ff05::1:3]"], "ok EADDRINUSE"),
]


@pytest.mark.parametrize(
    ("keys", "expected"), DOCUMENTED, ids=[" ".join(keys) for keys, _ in DOCUMENTED]
)
def test_documented_examples(kernel: Kernel, keys: list[str], expected: str) -> None:
    port = kernel.fresh_port()
    placed = [sock(k, port) for k in keys]
    assert " ".join(kernel.bind(placed)) == expected
    assert " ".join(predict(placed, PortTable(kernel.hash_entries))) == expected


@pytest.mark.parametrize("fillers", [0, 10])
def test_documented_secondary_hash_example(kernel: Kernel, fillers: int) -> None:
    _require_slot_sharing(kernel)
    # §7.2: 10 sockets on P+16384, W=0.0.0.0+RA, S=127.0.0.1+RA+RP, then C=127.0.0.1+RP.
    port = kernel.fresh_port()
    events = [sock(f"127.0.1.{n + 1}", port + kernel.hash_entries) for n in range(fillers)]
    events += [sock(k, port) for k in ("0.0.0.0+RA", "127.0.0.1+RA+RP", "127.0.0.1+RP")]
    expected = ["ok"] * (fillers + 2) + ["EADDRINUSE" if fillers else "ok"]
    assert kernel.bind(events) == expected
    assert predict(events, PortTable(kernel.hash_entries)) == expected


@pytest.mark.parametrize(
    ("address", "device", "expected"),
    [
        ("fe80::1%vb0", "", {"device": "vb0", "v6only": True}),
        ("fe80::1%vb0", "vb1", {"device": "vb0", "v6only": True}),
        ("fe80::1", "vb0", {"device": "vb0", "v6only": True}),
        ("fd99::1", "", {"device": "", "v6only": True}),
        ("::1", "lo", {"device": "lo", "v6only": True}),
        ("::", "", {"device": "", "v6only": False}),
        ("::ffff:127.0.0.1", "", {"device": "", "v6only": False}),
    ],
)
def test_kernel_reports_the_device_and_v6only_the_model_assumes(
    kernel: Kernel, address: str, device: str, expected: dict[str, object]
) -> None:
    # The model takes a zone as the bound device (even over SO_BINDTODEVICE) and treats a
    # specific IPv6 address as V6ONLY; getsockopt after bind() shows what the kernel did.
    spec = request(Sock(SocketName(ipaddress.ip_address(address), kernel.fresh_port(), device)))
    reply = kernel.worker.request([spec])
    assert reply["results"] == ["ok"]
    assert reply["details"][0] == {**expected, "uid": 0}


def test_worker_that_does_not_answer_fails_in_bounded_time(tmp_path: Path) -> None:
    # A worker that reads its requests but never replies: request() must give up on its own.
    require_netns()
    silent = tmp_path / "silent.py"
    silent.write_text("import sys\nsys.stdin.read()\n")
    with namespace() as ns, Worker(ns, silent, timeout=0.5) as worker:
        with pytest.raises(WorkerError, match="did not answer"):
            worker.request(["anything"])
        assert worker.returncode is None
    # close() ended it: its stdin was closed, so it exited, and it was reaped.
    assert worker.returncode == 0


def test_a_closed_socket_of_another_owner_frees_its_name(kernel: Kernel) -> None:
    # The worker gets sockets of other owners from a helper process; once closed here, no copy
    # may survive there, or the name would stay taken. Repeated, because a leak would be a race.
    for _ in range(100):
        port = kernel.fresh_port()
        events: list[Sock | Close] = [
            sock("127.0.0.1@65534", port),
            Close(0),
            sock("127.0.0.1", port),
        ]
        assert kernel.bind(events) == ["ok", "closed", "ok"]
