"""Listener states without a namespace: the pure rules, and the daemon's start gate in-process.

The pure part is tables: which bindings wait and why (``expand.find_absent``), which
addresses count as usable (``host.usable``), the retry backoff, the start-up gate and its
EXTEND_TIMEOUT_USEC. The in-process part runs a real ``Daemon`` on loopback: a surveyor that
reports a made-up interface table stands in for addresses coming and going.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
from conftest import RecordingNotifier, free_port, wait_until
from prometheus import samples, value
from prometheus_client import generate_latest

from udpbindd import host, netlink, states
from udpbindd.config import Config, parse_text
from udpbindd.daemon import Daemon, StartFailed
from udpbindd.expand import expand_all, find_absent
from udpbindd.metrics import Down, Snapshot, make_registry
from udpbindd.names import IPAddress
from udpbindd.survey import Survey, survey
from udpbindd.watch import view

DEADLINE = 10.0
ip = ipaddress.ip_address

TABLE: Mapping[str, Sequence[IPAddress]] = {
    "lo": (ip("127.0.0.1"), ip("::1")),
    "eth0": (ip("192.0.2.2"), ip("2001:db8::2"), ip("fe80::2")),
    "eth1": (ip("fe80::3"),),
}


def listeners(*lines: str) -> Config:
    return parse_text("listeners:\n" + "".join(f"  - {line}\n" for line in lines), "t.yaml")


def absent(
    line: str,
    table: Mapping[str, Sequence[IPAddress]] = TABLE,
    bindable: Callable[[IPAddress], bool] | None = None,
) -> list[tuple[str, str]]:
    expansion = expand_all(listeners(line).listeners, table)
    return [(a.binding.label, a.reason) for a in find_absent(expansion.bindings, table, bindable)]


# -- which bindings wait ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # Present: on an interface, the wildcard, multicast, 127/8 while lo has 127.0.0.1.
        ("{interface: 192.0.2.2, port: 53}", []),
        ('{interface: "2001:db8::2", port: 53}', []),
        ('{interface: "*", port: 53}', []),
        ("{interface: 239.1.2.3, port: 53}", []),
        ('{interface: "ff05::1:3", port: 53}', []),
        ("{interface: 127.0.0.53, port: 53}", []),
        ('{interface: "::ffff:192.0.2.2", port: 53}', []),
        ("{interface: eth0, port: 53}", []),
        ('{interface: "fe80::2%eth0", port: 53}', []),
        # Absent addresses.
        (
            "{interface: 192.0.2.9, port: 53}",
            [("192.0.2.9:53", "no interface has the address 192.0.2.9")],
        ),
        (
            '{interface: "2001:db8::9", port: 53}',
            [("[2001:db8::9]:53", "no interface has the address 2001:db8::9")],
        ),
        (
            '{interface: "::ffff:192.0.2.9", port: 53}',
            [("[::ffff:192.0.2.9]:53", "no interface has the address ::ffff:192.0.2.9")],
        ),
        # A link-local address counts on its own link only.
        (
            '{interface: "fe80::2%eth1", port: 53}',
            [("[fe80::2%eth1]:53", "fe80::2 is not an address of eth1")],
        ),
        (
            '{interface: "fe80::2%eth9", port: 53}',
            [("[fe80::2%eth9]:53", "interface eth9 does not exist")],
        ),
        # An absent device, with or without an address; freebind does not create devices.
        (
            '{interface: "*", family: ipv4, port: 53, device: eth9}',
            [("0.0.0.0:53%eth9", "interface eth9 does not exist")],
        ),
        (
            "{interface: 192.0.2.2, port: 53, device: eth9, freebind: true}",
            [("192.0.2.2:53%eth9", "interface eth9 does not exist")],
        ),
        ("{interface: 192.0.2.2, port: 53, device: eth1}", []),
        # freebind binds an address no interface has.
        ("{interface: 192.0.2.9, port: 53, freebind: true}", []),
        ('{interface: "2001:db8::9", port: 53, freebind: true}', []),
    ],
)
def test_which_bindings_wait(line: str, expected: list[tuple[str, str]]) -> None:
    assert absent(line) == expected


def test_127_slash_8_needs_lo_to_have_an_address() -> None:
    table = {"lo": ()}
    assert absent("{interface: 127.0.0.1, port: 53}", table) == [
        ("127.0.0.1:53", "no interface has the address 127.0.0.1")
    ]


def test_the_kernel_is_asked_about_unlisted_addresses_once_each() -> None:
    asked: list[IPAddress] = []

    def bindable(address: IPAddress) -> bool:
        asked.append(address)
        return address == ip("192.0.2.255")  # a subnet broadcast: local, yet listed nowhere

    lines = listeners(
        "{name: a, interface: 192.0.2.255, port: 53}",
        "{name: b, interface: 192.0.2.255, port: 54}",
        "{name: c, interface: 192.0.2.9, port: 53}",
        "{name: d, interface: 192.0.2.2, port: 53}",
    )
    expansion = expand_all(lines.listeners, TABLE)
    found = find_absent(expansion.bindings, TABLE, bindable)
    assert [a.binding.listener.name for a in found] == ["c"]
    assert asked == [ip("192.0.2.255"), ip("192.0.2.9")]


def test_the_kernel_probe_tells_local_from_absent() -> None:
    # 127.0.0.2 is local through lo's 127.0.0.0/8; TEST-NET-2 is on no test host.
    assert host.bindable(ip("127.0.0.2")) is True
    assert host.bindable(ip("::ffff:127.0.0.1")) is True
    assert host.bindable(ip("198.51.100.77")) is False
    assert host.bindable(ip("2001:db8::77")) is False


# -- usable addresses and the interface table ----------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "usable"),
    [
        (0, True),
        (netlink.IFA_F_PERMANENT, True),
        (netlink.IFA_F_NODAD, True),
        (netlink.IFA_F_TENTATIVE, False),
        (netlink.IFA_F_TENTATIVE | netlink.IFA_F_OPTIMISTIC, True),
        (netlink.IFA_F_DADFAILED | netlink.IFA_F_TENTATIVE, False),
        (netlink.IFA_F_DEPRECATED, True),
    ],
)
def test_usable_address_flags(flags: int, usable: bool) -> None:
    assert host.usable(flags) is usable


def _link(index: int, name: str, *, up: bool = True) -> netlink.LinkMessage:
    header = netlink.Header(0, netlink.RTM_NEWLINK, 0, 0, 0)
    return netlink.LinkMessage(header, 0, 1, index, netlink.IFF_UP if up else 0, 0, name)


def _addr(index: int, address: str, flags: int = 0, *, deleted: bool = False) -> netlink.Message:
    kind = netlink.RTM_DELADDR if deleted else netlink.RTM_NEWADDR
    value_ = ip(address)
    family = socket.AF_INET if value_.version == 4 else socket.AF_INET6
    header = netlink.Header(0, kind, 0, 0, 0)
    return netlink.AddressMessage(header, family, 64, flags, 0, index, value_, None, None)


def test_a_tentative_address_joins_the_table_once_dad_is_done() -> None:
    table = host.apply_messages({}, [_link(3, "vb0"), _addr(3, "fd03::7", netlink.IFA_F_TENTATIVE)])
    assert table["vb0"].addresses == ()
    # The kernel announces the address again, without the flag, once DAD has succeeded.
    table = host.apply_messages(table, [_addr(3, "fd03::7")])
    assert table["vb0"].addresses == (ip("fd03::7"),)
    # A later tentative announcement (DAD restarted) takes it out again.
    table = host.apply_messages(table, [_addr(3, "fd03::7", netlink.IFA_F_TENTATIVE)])
    assert table["vb0"].addresses == ()


def test_the_watch_view_ignores_a_link_going_down() -> None:
    table = host.apply_messages({}, [_link(3, "vb0"), _addr(3, "10.0.0.1")])
    down = host.apply_messages(table, [_link(3, "vb0", up=False)])
    assert down["vb0"].up is False
    assert view(down) == view(table)
    # A new index (deleted and created again) is a change, even with the same addresses.
    again = host.apply_messages({}, [_link(4, "vb0"), _addr(4, "10.0.0.1")])
    assert view(again) != view(table)


# -- retries, the start gate, STATUS= ------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "delay"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (1000, 60.0)],
)
def test_retry_delay_doubles_up_to_a_minute(attempts: int, delay: float) -> None:
    assert states.retry_delay(attempts) == delay


def test_backoff_counts_only_tries_that_were_due() -> None:
    backoff = states.Backoff()
    key = ("x", "127.0.0.1:53")
    backoff.update([key], now=100.0)
    assert backoff.due() == 101.0
    backoff.update([key], now=100.5)  # an early try (an interface event): schedule stands
    assert backoff.due() == 101.0
    backoff.update([key], now=101.0)
    assert backoff.due() == 103.0
    backoff.update([key], now=103.2)
    assert backoff.delay(key, 103.2) == pytest.approx(4.0)
    backoff.update([], now=104.0)  # bound at last: forgotten, and nothing left to retry
    assert backoff.due() is None
    assert backoff.delay(key, 104.0) is None
    backoff.update([key], now=200.0)  # failing again starts from the first delay
    assert backoff.due() == 201.0


def test_changes_are_what_differs() -> None:
    bound = states.Entry(states.BOUND)
    waiting = states.Entry(states.WAITING, "no interface has the address 192.0.2.1")
    before = {("a", "1"): bound, ("b", "2"): waiting}
    after = {
        ("a", "1"): states.Entry(states.WAITING, "interface eth0 does not exist"),
        ("b", "2"): waiting,
        ("c", "3"): bound,
    }
    assert states.changes(before, after) == [
        (("a", "1"), states.Entry(states.WAITING, "interface eth0 does not exist")),
        (("c", "3"), bound),
    ]


def test_the_start_gate() -> None:
    assert states.gate([], started=10.0, now=11.0) == states.Gate(ready=True)
    slow = states.Holding("slow", "192.0.2.1:53", "absent", 90.0)
    quick = states.Holding("quick", "eth9 port 53", "absent", 2.0)
    waiting = states.gate([slow, quick], started=10.0, now=11.0)
    assert (waiting.ready, waiting.deadline, waiting.expired) == (False, 12.0, ())
    late = states.gate([slow, quick], started=10.0, now=12.0)
    assert late.expired == (quick,)
    assert states.gate([states.Holding("now", "x", "absent", 0.0)], 10.0, 10.0).expired


@pytest.mark.parametrize(
    ("left", "usec"),
    [(80.0, 15_000_000), (10.0, 15_000_000), (3.0, 8_000_000), (0.0, 5_000_000), (-1.0, 5_000_000)],
)
def test_extend_timeout_covers_the_next_message_and_never_outlives_the_deadline_by_much(
    left: float, usec: int
) -> None:
    assert states.extend_usec(now=100.0, deadline=100.0 + left) == usec


def test_status_text() -> None:
    assert states.status_text(3, 1, 0) == "3 bound, 1 waiting, 0 failed"


def test_the_state_metric_has_one_series_per_state() -> None:
    snap = Snapshot(
        down=[Down("later", "192.0.2.1:53", "waiting"), Down("broken", "127.0.0.1:53")],
    )
    found = samples(generate_latest(make_registry(lambda: snap)).decode())
    name = "udpbindd_listener_state"
    for listener, sock, current in (
        ("later", "192.0.2.1:53", "waiting"),
        ("broken", "127.0.0.1:53", "failed"),
    ):
        assert value(found, "udpbindd_listener_up", listener=listener, socket=sock) == 0
        for state in states.STATES:
            labels = {"listener": listener, "socket": sock, "state": state}
            assert value(found, name, **labels) == (1 if state == current else 0), labels


# -- the daemon in-process -------------------------------------------------------------------------


class FakeHost:
    """A surveyor over a made-up interface table: addresses come and go as the test says."""

    def __init__(self, table: dict[str, tuple[IPAddress, ...]]) -> None:
        self.table = table

    def __call__(self, listeners: Any, **kwargs: Any) -> Survey:
        kwargs["interfaces"] = self.table
        kwargs["bindable"] = None  # only the table counts
        return survey(listeners, **kwargs)


@contextlib.contextmanager
def started_daemon(cfg: Config, **kwargs: Any) -> Iterator[Daemon]:
    daemon = Daemon(cfg, watch=False, **kwargs)
    try:
        surveyor = kwargs.get("surveyor", survey)
        daemon.start(surveyor(cfg.enabled_listeners))
        yield daemon
    finally:
        daemon.shutdown()


def test_refresh_closes_what_lost_its_address_and_binds_it_again_when_it_returns(
    log_events: list[dict[str, Any]],
) -> None:
    port = free_port()
    cfg = listeners(f"{{name: here, interface: 127.0.0.1, port: {port}}}")
    fake = FakeHost({"lo": (ip("127.0.0.1"),)})
    with started_daemon(cfg, surveyor=fake) as daemon:
        assert [str(name) for name in daemon.served] == [f"127.0.0.1:{port}"]
        fake.table = {"lo": ()}
        daemon.refresh()
        assert daemon.served == {}
        assert [str(item) for item in daemon.waiting] == [
            f"listener 'here' (127.0.0.1:{port}): no interface has the address 127.0.0.1"
        ]
        assert daemon.status_text() == "0 bound, 1 waiting, 0 failed"
        assert daemon.snapshot().down == (Down("here", f"127.0.0.1:{port}", "waiting"),)
        fake.table = {"lo": (ip("127.0.0.1"),)}
        daemon.refresh()
        assert [str(name) for name in daemon.served] == [f"127.0.0.1:{port}"]
        assert daemon.waiting == []
    names = [e["event"] for e in log_events if e.get("listener") == "here"]
    assert names == [
        "listener_bound",
        "listener_closed",
        "listener_waiting",
        "listener_bound",
    ]
    refreshed = [e for e in log_events if e["event"] == "listeners_refreshed"]
    assert [(e["added"], e["removed"], e["waiting"]) for e in refreshed] == [(0, 1, 1), (1, 0, 0)]


def test_a_refresh_never_rolls_back_a_required_failure() -> None:
    port = free_port()
    cfg = listeners(
        f"{{name: a, interface: lo, family: ipv4, port: {port}}}",
        f"{{name: b, interface: 127.0.0.1, port: {port}, required: true}}",
    )
    fake = FakeHost({"lo": ()})
    with started_daemon(cfg, surveyor=fake) as daemon:
        assert daemon.served == {}
        # 127.0.0.1 appears: "a" is served first in config order, "b" clashes. Strictly
        # (start, reload) that would undo everything; an address event fails "b" alone.
        fake.table = {"lo": (ip("127.0.0.1"),)}
        daemon.refresh()
        assert [served.binding.listener.name for served in daemon.served.values()] == ["a"]
        (failure,) = daemon.failures
        assert failure.listener.name == "b"
        assert failure.errno_name == "EADDRINUSE"
        assert "clashes with listener 'a'" in failure.reason


def test_a_serving_socket_keeps_its_name_when_a_new_binding_would_clash_with_it() -> None:
    port = free_port()
    cfg = listeners(
        f"{{name: first, interface: lo, family: ipv4, port: {port}}}",
        f"{{name: second, interface: 127.0.0.1, port: {port}}}",
    )
    # "second" is serving; "first" (earlier in the file) gains the same address later.
    fake = FakeHost({"lo": (ip("127.0.0.2"),)})
    with started_daemon(cfg, surveyor=fake) as daemon:
        assert {s.binding.listener.name for s in daemon.served.values()} == {"first", "second"}
        fake.table = {"lo": (ip("127.0.0.2"), ip("127.0.0.1"))}
        daemon.refresh()
        holder = daemon.served[next(n for n in daemon.served if str(n).startswith("127.0.0.1"))]
        assert holder.binding.listener.name == "second"
        assert [f.listener.name for f in daemon.failures] == ["first"]


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[list[BaseException]]:
    raised: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except StartFailed as error:
            raised.append(error)

    thread = threading.Thread(target=run, name="udpbindd-loop", daemon=True)
    thread.start()
    try:
        yield raised
    finally:
        daemon.wake(signal.SIGTERM)
        thread.join(DEADLINE)
        assert not thread.is_alive()


def test_a_required_waiting_listener_holds_ready_then_times_out() -> None:
    port = free_port()
    cfg = listeners(
        f"{{name: loop, interface: 127.0.0.1, port: {port}}}",
        f"{{name: later, interface: 198.51.100.1, port: {port}, bind_timeout: 0.4}}",
        f"{{name: spare, interface: 198.51.100.2, port: {port}, required: false}}",
    )
    notifier = RecordingNotifier()
    with started_daemon(cfg, notifier=notifier) as daemon:
        began = time.monotonic()
        with running(daemon) as raised:
            wait_until(lambda: bool(raised), "the start to fail")
        elapsed = time.monotonic() - began
        assert daemon.served == {}  # every socket closed
    (error,) = raised
    assert isinstance(error, StartFailed)
    assert str(error) == (
        f"listener 'later' (198.51.100.1:{port}): still waiting after 0.4 s (bind_timeout): "
        "no interface has the address 198.51.100.1"
    )
    assert 0.4 <= elapsed < 3.0
    assert not any("READY" in keys or "STOPPING" in keys for keys in notifier.fields())
    assert notifier.fields()[0] == {"EXTEND_TIMEOUT_USEC", "STATUS"}
    status = dict(f.partition("=")[::2] for f in notifier.sent[0])["STATUS"]
    assert status == (
        "1 bound, 2 waiting, 0 failed; starting: waiting for listener 'later' "
        f"(198.51.100.1:{port}), at most 0 s more"
    )


def test_extend_timeout_is_sent_again_while_the_start_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(states, "EXTEND_INTERVAL", 0.1)
    port = free_port()
    cfg = listeners(f"{{name: later, interface: 198.51.100.1, port: {port}, bind_timeout: 0.55}}")
    notifier = RecordingNotifier()
    with started_daemon(cfg, notifier=notifier) as daemon, running(daemon) as raised:
        wait_until(lambda: bool(raised), "the start to fail")
    extends = [
        int(dict(f.partition("=")[::2] for f in fields)["EXTEND_TIMEOUT_USEC"])
        for fields in notifier.sent
    ]
    # One at once, then one per interval until the deadline, each shorter as it nears.
    assert 3 <= len(extends) <= 7
    assert extends == sorted(extends, reverse=True)
    assert all(5_000_000 <= usec <= 5_600_000 for usec in extends)


def test_bind_timeout_0_fails_at_once_and_optional_listeners_never_hold_ready() -> None:
    port = free_port()
    optional = RecordingNotifier()
    cfg = listeners(
        f"{{name: loop, interface: 127.0.0.1, port: {port}}}",
        f"{{name: spare, interface: 198.51.100.2, port: {port}, required: false}}",
    )
    with started_daemon(cfg, notifier=optional) as daemon, running(daemon) as raised:
        wait_until(lambda: daemon.ready, "READY=1")
        assert raised == []
    assert optional.sent[0] == ("READY=1", "STATUS=1 bound, 1 waiting, 0 failed")

    strict = RecordingNotifier()
    cfg = listeners(f"{{name: later, interface: 198.51.100.1, port: {port}, bind_timeout: 0}}")
    with started_daemon(cfg, notifier=strict) as daemon, running(daemon) as raised:
        wait_until(lambda: bool(raised), "the start to fail")
    assert "still waiting after 0 s (bind_timeout)" in str(raised[0])
    assert strict.sent == []


def test_a_reload_before_ready_sends_neither_reloading_nor_ready() -> None:
    port = free_port()
    text = f"{{name: later, interface: 198.51.100.1, port: {port}, bind_timeout: 30}}"
    cfg = listeners(text)
    notifier = RecordingNotifier()
    with started_daemon(cfg, notifier=notifier, loader=lambda: cfg) as daemon:
        daemon.reload()
        assert notifier.fields() == [{"STATUS"}]
        assert notifier.sent[0] == ("STATUS=0 bound, 1 waiting, 0 failed",)
        assert daemon.ready is False
