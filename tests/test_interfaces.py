"""Following the interfaces, against the kernel: addresses and interfaces that come and go.

Each test creates its own network namespaces (veth pairs: the kernel may lack ``dummy``),
runs ``udpbindd run`` inside one with ``ip netns exec``, and sends its datagrams from a client
worker (tests/udpclient.py) inside the same namespace or, where a packet must really cross an
interface, inside a second namespace on the other end of the veth. "Answers within a second"
is measured from just before the ``ip`` command that adds the address to the first reply,
polling every 20 ms. Namespaces are deleted by name and processes killed by pid afterwards.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from daemonproc import DaemonProcess, plain_lines
from netns import Veth, Worker, ip, namespace, require_netns
from prometheus import samples, value

from udpbindd import host

pytestmark = pytest.mark.netns

CLIENT = Path(__file__).parent / "udpclient.py"
# The bound: a listener answers well under a second after its address appears.
ANSWER_WITHIN = 1.0
POLL_EVERY = 0.02
EVENT_DEADLINE = 10.0
METRICS_PORT = 9917
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
WriteConfig = Callable[[str], Path]


# -- the daemon and its log -------------------------------------------------------------------


class Server:
    """``udpbindd run`` inside a namespace, and its JSON log events since a mark.

    ``next`` finds each event once, in any order after the mark: one interface change logs
    several events, and their order among listeners is not what the tests are about.
    """

    def __init__(self, ns: str, config: Path, env: dict[str, str] | None = None) -> None:
        self.daemon = DaemonProcess(
            config, args=("--log-format", "json"), prefix=("ip", "netns", "exec", ns)
        )
        for name in SYSTEMD_VARIABLES:
            self.daemon.env.pop(name, None)
        self.daemon.env.update(env or {})
        self.base = 0
        self.used: set[int] = set()

    def __enter__(self) -> Server:
        self.daemon.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.daemon.__exit__(*exc)

    @property
    def pid(self) -> int:
        return self.daemon.pid

    def _read(self, timeout: float) -> bool:
        """Read what stderr has within ``timeout``; False at end of file or on timeout."""
        proc = self.daemon.proc
        assert proc is not None
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            if not selector.select(timeout):
                return False
        chunk = os.read(fd, 65536)
        self.daemon.stderr += chunk
        return bool(chunk)

    def mark(self) -> None:
        """Skip every event logged so far: ``next`` then finds only later ones."""
        while self._read(0):
            pass
        self.base = len(self.daemon.events)
        self.used.clear()

    def next(self, event: str, deadline: float = EVENT_DEADLINE, **fields: Any) -> dict[str, Any]:
        """An event named ``event`` with ``fields`` since the mark, not found before (bounded)."""
        end = time.monotonic() + deadline
        while True:
            events = self.daemon.events
            for index in range(self.base, len(events)):
                found = events[index]
                if (
                    index not in self.used
                    and found.get("event") == event
                    and all(found.get(key) == wanted for key, wanted in fields.items())
                ):
                    self.used.add(index)
                    return found
            left = end - time.monotonic()
            if left <= 0 or not self._read(left):
                raise TimeoutError(
                    f"no {event} {fields} within {deadline} s; stderr:\n"
                    + self.daemon.stderr.decode(errors="replace")
                )

    def events_since_mark(self, event: str) -> list[dict[str, Any]]:
        while self._read(0):
            pass
        return [e for e in self.daemon.events[self.base :] if e.get("event") == event]


def udp_sockets(ns: str) -> set[str]:
    """``address:port`` of every UDP socket bound in namespace ``ns`` (its /proc/net/udp*)."""
    found: set[str] = set()
    for path in host.PROC_UDP:
        text = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", path],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        for row in host.parse_proc_udp(text):
            address = f"[{row.address}]" if row.address.version == 6 else str(row.address)
            found.add(f"{address}:{row.port}")
    return found


def answered_within(client: Worker, host_: str, port: int, since: float) -> float:
    """Poll ``host_:port`` every 20 ms until ``since`` + 1 s; return when it first answered."""
    reply = client.request(
        {"poll": [host_, port], "until": since + ANSWER_WITHIN, "every": POLL_EVERY}
    )
    assert reply["reply"] is not None, (
        f"{host_}:{port} did not answer within {ANSWER_WITHIN} s ({reply['tries']} tries)"
    )
    return float(reply["at"]) - since


def exchange(client: Worker, host_: str, port: int, timeout: float = 1.0) -> dict[str, Any]:
    reply: dict[str, Any] = client.request({"exchange": [host_, port], "timeout": timeout})
    return reply


def states(client: Worker) -> dict[tuple[str, str], str]:
    """udpbindd_listener_state scraped from inside the namespace: the state of each series."""
    found = samples(client.request({"scrape": METRICS_PORT})["text"])
    current: dict[tuple[str, str], str] = {}
    for (name, labels), number in found.items():
        if name == "udpbindd_listener_state" and number == 1:
            fields = dict(labels)
            current[fields["listener"], fields["socket"]] = fields["state"]
    return current


def up(client: Worker, listener: str, socket_label: str) -> float | None:
    found = samples(client.request({"scrape": METRICS_PORT})["text"])
    return value(found, "udpbindd_listener_up", listener=listener, socket=socket_label)


def metrics_yaml() -> str:
    return f"metrics: {{listen: ['127.0.0.1:{METRICS_PORT}']}}\n"


@contextmanager
def wired(prefix: str) -> Iterator[tuple[str, str]]:
    """(server, client) namespaces, each with lo up and nothing else yet."""
    require_netns()
    with namespace(prefix=f"{prefix}s") as server, namespace(prefix=f"{prefix}c") as client:
        yield server, client


def plug(
    server: str, client: str, name: str, peer: str, subnet: str, *, broadcast: bool = False
) -> None:
    """A veth from ``server`` (``name``, SUBNET.1) to ``client`` (``peer``, SUBNET.2), up.

    With ``broadcast`` both addresses carry IFA_BROADCAST (``brd SUBNET.255``).
    """
    brd = ("brd", f"{subnet}.255") if broadcast else ()
    ip("-n", server, "link", "add", name, "type", "veth", "peer", "name", peer, "netns", client)
    ip("-n", server, "address", "add", f"{subnet}.1/24", *brd, "dev", name)
    ip("-n", client, "address", "add", f"{subnet}.2/24", *brd, "dev", peer)
    ip("-n", server, "link", "set", name, "up")
    ip("-n", client, "link", "set", peer, "up")


# -- an address that comes, goes and comes back ----------------------------------------------


def test_a_listener_waits_for_its_address_and_answers_within_a_second_of_it(
    write_config: WriteConfig,
) -> None:
    require_netns()
    config = write_config(
        "listeners:\n"
        "  - {name: later, interface: 10.203.0.1, port: 5300, required: false}\n"
        "  - {name: loop, interface: 127.0.0.1, port: 5300}\n" + metrics_yaml()
    )
    with (
        namespace([Veth("vb0", "vb1")]) as ns,
        Server(ns, config) as server,
        Worker(ns, CLIENT) as client,
    ):
        waiting = server.next("listener_waiting", listener="later")
        assert waiting["reason"] == "no interface has the address 10.203.0.1"
        assert waiting["socket"] == "10.203.0.1:5300"
        server.next("started")
        assert exchange(client, "127.0.0.1", 5300)["reply"] == "Your data was 14 bytes"
        assert states(client)[("later", "10.203.0.1:5300")] == "waiting"
        assert up(client, "later", "10.203.0.1:5300") == 0

        for _ in ("first", "again"):
            server.mark()
            since = time.monotonic()
            ip("-n", ns, "address", "add", "10.203.0.1/24", "dev", "vb0")
            answered_within(client, "10.203.0.1", 5300, since)
            server.next("listener_bound", listener="later", socket="10.203.0.1:5300")
            assert states(client)[("later", "10.203.0.1:5300")] == "bound"
            assert up(client, "later", "10.203.0.1:5300") == 1

            server.mark()
            ip("-n", ns, "address", "del", "10.203.0.1/24", "dev", "vb0")
            server.next("listener_closed", listener="later", socket="10.203.0.1:5300")
            server.next("listener_waiting", listener="later", socket="10.203.0.1:5300")
            assert "10.203.0.1:5300" not in udp_sockets(ns)
            # The daemon runs on and the other listener serves throughout.
            assert server.daemon.proc is not None
            assert server.daemon.proc.poll() is None
            assert exchange(client, "127.0.0.1", 5300)["reply"] == "Your data was 14 bytes"
            assert states(client)[("later", "10.203.0.1:5300")] == "waiting"
            assert up(client, "later", "10.203.0.1:5300") == 0
        assert server.events_since_mark("bind_failed") == []
        assert server.daemon.stop() == 0


def test_an_interface_listener_gains_and_loses_addresses_of_its_family(
    write_config: WriteConfig,
) -> None:
    require_netns()
    config = write_config(
        "listeners:\n"
        "  - {name: four, interface: vb0, port: 5301, family: ipv4, required: false}\n"
        "  - {name: six, interface: vb0, port: 5302, family: ipv6, required: false}\n"
        + metrics_yaml()
    )
    veth = Veth("vb0", "vb1")
    with namespace([veth]) as ns:
        # No automatic link-local address: the IPv6 addresses are the ones the test adds.
        ip("-n", ns, "link", "set", "vb0", "addrgenmode", "none")
        with Server(ns, config) as server, Worker(ns, CLIENT) as client:
            assert server.next("listener_waiting", listener="four")["reason"] == (
                "interface vb0 has no IPv4 address"
            )
            server.next("started")
            # Two subnets: deleting a primary address deletes its subnet's secondary ones too.
            for address in ("10.203.1.1", "10.203.2.1"):
                since = time.monotonic()
                ip("-n", ns, "address", "add", f"{address}/24", "dev", "vb0")
                answered_within(client, address, 5301, since)
            since = time.monotonic()
            ip("-n", ns, "-6", "address", "add", "fd03::1/64", "dev", "vb0", "nodad")
            answered_within(client, "fd03::1", 5302, since)
            # Each family only: no IPv6 socket for "four", no IPv4 one for "six".
            bound = udp_sockets(ns)
            assert {"10.203.1.1:5301", "10.203.2.1:5301", "[fd03::1]:5302"} <= bound
            assert "[fd03::1]:5301" not in bound
            assert not {"10.203.1.1:5302", "10.203.2.1:5302"} & bound
            assert exchange(client, "fd03::1", 5301)["error"] == "ECONNREFUSED"

            server.mark()
            ip("-n", ns, "address", "del", "10.203.1.1/24", "dev", "vb0")
            server.next("listener_closed", listener="four", socket="10.203.1.1:5301")
            bound = udp_sockets(ns)
            assert "10.203.1.1:5301" not in bound
            assert "10.203.2.1:5301" in bound
            assert exchange(client, "10.203.2.1", 5301)["reply"] == "Your data was 14 bytes"
            assert states(client) == {
                ("four", "10.203.2.1:5301"): "bound",
                ("six", "[fd03::1]:5302"): "bound",
            }
            # The last address goes: the listener waits for the interface to have one again.
            ip("-n", ns, "address", "del", "10.203.2.1/24", "dev", "vb0")
            server.next("listener_waiting", listener="four", socket="vb0 port 5301")
            assert states(client)[("four", "vb0 port 5301")] == "waiting"
            assert server.daemon.stop() == 0


def test_a_tentative_ipv6_address_waits_for_duplicate_address_detection(
    write_config: WriteConfig,
) -> None:
    require_netns()
    config = write_config(
        "listeners:\n  - {name: six, interface: 'fd03::7', port: 5303, required: false}\n"
        "  - {name: loop, interface: 127.0.0.1, port: 5303}\n"
    )
    with (
        namespace([Veth("vb0", "vb1")]) as ns,
        Server(ns, config) as server,
        Worker(ns, CLIENT) as client,
    ):
        server.next("started")
        server.mark()
        # Without nodad the address is tentative until DAD has run (about a second here).
        ip("-n", ns, "-6", "address", "add", "fd03::7/64", "dev", "vb0")
        flags = ip("-n", ns, "-6", "address", "show", "to", "fd03::7/128")
        assert "tentative" in flags, "DAD finished before the test could look"
        reply = client.request({"poll": ["fd03::7", 5303], "until": time.monotonic() + 10})
        assert reply["reply"] == "Your data was 14 bytes"
        assert "tentative" not in ip("-n", ns, "-6", "address", "show", "to", "fd03::7/128")
        server.next("listener_bound", listener="six")
        # Never tried while tentative (bind() would refuse it): no failure on the way.
        assert server.events_since_mark("bind_failed") == []
        assert server.daemon.stop() == 0


# -- interfaces deleted, re-created, down and up ---------------------------------------------


def test_interface_deleted_and_created_again(write_config: WriteConfig) -> None:
    config = write_config(
        "listeners:\n"
        "  - {name: dev, interface: '*', family: ipv4, device: vd0, port: 5304,"
        " required: false}\n"
        "  - {name: ifc, interface: vd0, family: ipv4, port: 5305, required: false}\n"
        "  - {name: loop, interface: 127.0.0.1, port: 5306}\n"
    )
    with wired("udpdel") as (server_ns, client_ns), ExitStack() as stack:
        server = stack.enter_context(Server(server_ns, config))
        client = stack.enter_context(Worker(client_ns, CLIENT))
        assert server.next("listener_waiting", listener="dev")["reason"] == (
            "interface vd0 does not exist"
        )
        assert server.next("listener_waiting", listener="ifc")["socket"] == "vd0 port 5305"
        server.next("started")
        for _ in range(2):
            since = time.monotonic()
            plug(server_ns, client_ns, "vd0", "vd1", "10.204.0")
            # Over the wire, from the other namespace: the packets arrive on vd0.
            answered_within(client, "10.204.0.1", 5304, since)
            answered_within(client, "10.204.0.1", 5305, since)
            assert {"0.0.0.0:5304", "10.204.0.1:5305"} <= udp_sockets(server_ns)

            server.mark()
            ip("-n", server_ns, "link", "del", "vd0")
            server.next("listener_closed", listener="dev", socket="0.0.0.0:5304%vd0")
            server.next("listener_waiting", listener="dev", socket="0.0.0.0:5304%vd0")
            server.next("listener_waiting", listener="ifc", socket="vd0 port 5305")
            assert not {"0.0.0.0:5304", "10.204.0.1:5305"} & udp_sockets(server_ns)

        # Deleted and created again while the daemon cannot look: it sees one burst in which
        # vd0 still exists, under a new index. The device socket must be bound afresh.
        plug(server_ns, client_ns, "vd0", "vd1", "10.204.0")
        answered_within(client, "10.204.0.1", 5304, time.monotonic())
        server.mark()
        os.kill(server.pid, signal.SIGSTOP)
        try:
            ip("-n", server_ns, "link", "del", "vd0")
            plug(server_ns, client_ns, "vd0", "vd1", "10.204.0")
        finally:
            since = time.monotonic()
            os.kill(server.pid, signal.SIGCONT)
        answered_within(client, "10.204.0.1", 5304, since)
        answered_within(client, "10.204.0.1", 5305, since)
        closed = server.next("listener_closed", listener="dev")
        assert closed["reason"] == "interface vd0 was created again"
        # Bound again under the new index, it is left alone by the next change.
        server.mark()
        ip("-n", server_ns, "address", "add", "10.204.9.1/24", "dev", "vd0")
        server.next("listener_bound", listener="ifc", socket="10.204.9.1:5305")
        server.next("listeners_refreshed")
        assert server.events_since_mark("listener_closed") == []
        assert server.daemon.stop() == 0


def test_link_down_and_up(write_config: WriteConfig) -> None:
    config = write_config(
        "listeners:\n"
        "  - {name: four, interface: vd0, family: ipv4, port: 5307, required: false}\n"
        "  - {name: six, interface: 'fd04::1', port: 5308, required: false}\n"
    )
    with wired("udplnk") as (server_ns, client_ns), ExitStack() as stack:
        plug(server_ns, client_ns, "vd0", "vd1", "10.204.1")
        for ns, name, address in ((server_ns, "vd0", "fd04::1"), (client_ns, "vd1", "fd04::2")):
            ip("-n", ns, "-6", "address", "add", f"{address}/64", "dev", name, "nodad")
        server = stack.enter_context(Server(server_ns, config))
        client = stack.enter_context(Worker(client_ns, CLIENT))
        server.next("started")
        answered_within(client, "10.204.1.1", 5307, time.monotonic())
        answered_within(client, "fd04::1", 5308, time.monotonic())

        server.mark()
        ip("-n", server_ns, "link", "set", "vd0", "down")
        # The kernel removes IPv6 addresses from a link that goes down: that socket waits.
        server.next("listener_waiting", listener="six", socket="[fd04::1]:5308")
        assert exchange(client, "10.204.1.1", 5307, timeout=0.3)["reply"] is None
        # An IPv4 address stays on a down link, and stays bindable: its socket stays open.
        assert "10.204.1.1:5307" in udp_sockets(server_ns)
        assert [e["listener"] for e in server.events_since_mark("listener_closed")] == ["six"]

        since = time.monotonic()
        ip("-n", server_ns, "link", "set", "vd0", "up")
        answered_within(client, "10.204.1.1", 5307, since)
        # The IPv6 addresses went with the link; the operator (here the test) adds them back.
        since = time.monotonic()
        for ns, name, address in ((server_ns, "vd0", "fd04::1"), (client_ns, "vd1", "fd04::2")):
            ip("-n", ns, "-6", "address", "replace", f"{address}/64", "dev", name, "nodad")
        answered_within(client, "fd04::1", 5308, since)
        assert server.daemon.stop() == 0


# -- start-up: READY=1 held while a required listener waits ----------------------------------


class Notify:
    """The receiving end of NOTIFY_SOCKET (a path: it reaches across network namespaces)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[tuple[float, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def next(self, key: str, deadline: float = EVENT_DEADLINE) -> tuple[float, dict[str, str]]:
        """The next message with ``key`` (others are kept in ``received``), bounded."""
        end = time.monotonic() + deadline
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            self.received.append((time.monotonic(), fields))
            if key in fields:
                return self.received[-1]
        raise TimeoutError(f"no {key} within {deadline} s; received {self.received}")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[Notify]:
    receiver = Notify(tmp_path / "notify")
    yield receiver
    receiver.close()


def test_a_required_waiting_listener_holds_ready_until_its_address_appears(
    write_config: WriteConfig, notify: Notify
) -> None:
    require_netns()
    config = write_config(
        "listeners:\n"
        "  - {name: later, interface: 10.205.0.1, port: 5309, bind_timeout: 60}\n"
        "  - {name: loop, interface: 127.0.0.1, port: 5309}\n"
    )
    with (
        namespace([Veth("vb0", "vb1")]) as ns,
        Server(ns, config, {"NOTIFY_SOCKET": str(notify.path)}) as server,
        Worker(ns, CLIENT) as client,
    ):
        _, extend = notify.next("EXTEND_TIMEOUT_USEC")
        # Enough for the next extension (5 s later) with room to spare; never the whole 60 s.
        assert 5_000_000 < int(extend["EXTEND_TIMEOUT_USEC"]) <= 15_000_000
        assert extend["STATUS"].startswith("1 bound, 1 waiting, 0 failed; starting: waiting")
        waiting = server.next("start_waiting")
        assert (waiting["listener"], waiting["bind_timeout"]) == ("later", 60.0)
        # Serving already, but not READY while a required listener waits.
        assert exchange(client, "127.0.0.1", 5309)["reply"] == "Your data was 14 bytes"
        assert not any("READY" in fields for _, fields in notify.received)

        since = time.monotonic()
        ip("-n", ns, "address", "add", "10.205.0.1/24", "dev", "vb0")
        at, ready = notify.next("READY")
        assert at - since < ANSWER_WITHIN
        assert ready == {"READY": "1", "STATUS": "2 bound, 0 waiting, 0 failed"}
        assert exchange(client, "10.205.0.1", 5309)["reply"] == "Your data was 14 bytes"
        assert server.next("ready")["waited_seconds"] > 0
        assert server.daemon.stop() == 0


def test_a_required_listener_still_waiting_at_its_bind_timeout_fails_the_start(
    write_config: WriteConfig, notify: Notify
) -> None:
    require_netns()
    config = write_config(
        "listeners:\n"
        "  - {name: later, interface: 10.205.1.1, port: 5310, bind_timeout: 1.5}\n"
        "  - {name: loop, interface: 127.0.0.1, port: 5310}\n"
        "  - {name: extra, interface: 10.205.1.2, port: 5310, required: false,"
        " bind_timeout: 0}\n"
    )
    with (
        namespace([Veth("vb0", "vb1")]) as ns,
        Server(ns, config, {"NOTIFY_SOCKET": str(notify.path)}) as server,
    ):
        began = time.monotonic()
        notify.next("EXTEND_TIMEOUT_USEC")
        assert server.daemon.wait(timeout=EVENT_DEADLINE) == 1
        elapsed = time.monotonic() - began
    # It did wait (about bind_timeout), then said why in one line: the optional listener,
    # waiting too, neither held the start nor failed it.
    assert 1.4 <= elapsed < 5.0
    assert plain_lines(server.daemon.stderr) == [
        "udpbindd: cannot bind listener 'later' (10.205.1.1:5310): still waiting after 1.5 s "
        "(bind_timeout): no interface has the address 10.205.1.1"
    ]
    while True:
        try:
            notify.next("STATUS", deadline=0.5)
        except TimeoutError:
            break
    messages = [fields for _, fields in notify.received]
    assert not any("READY" in fields for fields in messages)
    assert messages[-1] == {
        "STATUS": "failed: listener 'later' (10.205.1.1:5310): still waiting after 1.5 s "
        "(bind_timeout): no interface has the address 10.205.1.1"
    }


# -- freebind, device binding and link-local scope ------------------------------------------


def test_freebind_binds_before_the_address_exists(write_config: WriteConfig) -> None:
    require_netns()
    config = write_config(
        "listeners:\n"
        "  - {name: v4, interface: 10.206.0.1, port: 5311, freebind: true}\n"
        "  - {name: v6, interface: 'fd06::1', port: 5311, freebind: true}\n"
    )
    with (
        namespace([Veth("vb0", "vb1")]) as ns,
        Server(ns, config) as server,
        Worker(ns, CLIENT) as client,
    ):
        started = server.next("started")
        assert (started["bound"], started["waiting"]) == (2, 0)
        # Bound to addresses this namespace does not have (yet).
        assert {"10.206.0.1:5311", "[fd06::1]:5311"} <= udp_sockets(ns)
        server.mark()
        since = time.monotonic()
        ip("-n", ns, "address", "add", "10.206.0.1/24", "dev", "vb0")
        ip("-n", ns, "-6", "address", "add", "fd06::1/64", "dev", "vb0", "nodad")
        answered_within(client, "10.206.0.1", 5311, since)
        answered_within(client, "fd06::1", 5311, since)
        # The same sockets serve: nothing was bound again when the addresses arrived.
        assert server.events_since_mark("listener_bound") == []
        assert server.daemon.stop() == 0


def test_device_binding_receives_only_what_arrives_on_its_device(
    write_config: WriteConfig,
) -> None:
    config = write_config(
        "listeners:\n  - {name: wire, interface: '*', family: ipv4, device: vd0, port: 5312}\n"
    )
    with wired("udpdev") as (server_ns, client_ns), ExitStack() as stack:
        plug(server_ns, client_ns, "vd0", "vd1", "10.207.0")
        plug(server_ns, client_ns, "vd2", "vd3", "10.207.1")
        server = stack.enter_context(Server(server_ns, config))
        client = stack.enter_context(Worker(client_ns, CLIENT))
        local = stack.enter_context(Worker(server_ns, CLIENT))
        assert server.next("listener_bound")["socket"] == "0.0.0.0:5312%vd0"
        assert exchange(client, "10.207.0.1", 5312)["reply"] == "Your data was 14 bytes"
        # The same port on the same host, arriving on vd2 or on lo: the socket bound to vd0
        # never sees it, and the kernel refuses the datagram.
        assert exchange(client, "10.207.1.1", 5312)["error"] == "ECONNREFUSED"
        assert exchange(local, "127.0.0.1", 5312)["error"] == "ECONNREFUSED"
        assert server.daemon.stop() == 0


def test_link_local_addresses_bind_with_their_scope(write_config: WriteConfig) -> None:
    config = write_config(
        "listeners:\n"
        "  - {name: ll, interface: 'fe80::1%vl0', port: 5313, required: false}\n"
        "  - {name: lls, interface: vl0, family: ipv6, port: 5314, required: false}\n"
    )
    with wired("udpll") as (server_ns, client_ns), ExitStack() as stack:
        ip("-n", server_ns, "link", "add", "vl0", "type", "veth", "peer", "name", "vl1",
           "netns", client_ns)  # fmt: skip
        for ns, name in ((server_ns, "vl0"), (client_ns, "vl1")):
            ip("-n", ns, "link", "set", name, "addrgenmode", "none")
            ip("-n", ns, "link", "set", name, "up")
        ip("-n", client_ns, "-6", "address", "add", "fe80::2/64", "dev", "vl1", "nodad")
        server = stack.enter_context(Server(server_ns, config))
        client = stack.enter_context(Worker(client_ns, CLIENT))
        waiting = server.next("listener_waiting", listener="ll")
        assert waiting["reason"] == "fe80::1 is not an address of vl0"
        server.next("started")
        since = time.monotonic()
        ip("-n", server_ns, "-6", "address", "add", "fe80::1/64", "dev", "vl0", "nodad")
        # Reached through vl1 by its zone: the reply proves the socket holds vl0's scope.
        answered_within(client, "fe80::1%vl1", 5313, since)
        answered_within(client, "fe80::1%vl1", 5314, since)
        assert server.next("listener_bound", listener="ll")["socket"] == "[fe80::1%vl0]:5313"
        assert server.next("listener_bound", listener="lls")["socket"] == "[fe80::1%vl0]:5314"
        assert server.daemon.stop() == 0


# -- subnet broadcasts: the reflection guard learns them from the interface table -------------


def totals(local: Worker, listener: str) -> dict[str, float]:
    """``received``, ``sent`` and each drop reason of ``listener``, over all its sockets."""
    found = samples(local.request({"scrape": METRICS_PORT})["text"])
    counted: dict[str, float] = {}
    for (name, labels), number in found.items():
        fields = dict(labels)
        if fields.get("listener") != listener:
            continue
        if name == "udpbindd_dropped_packets_total":
            key = fields["reason"]
        elif name in ("udpbindd_received_packets_total", "udpbindd_sent_packets_total"):
            key = name.split("_")[1]
        else:
            continue
        counted[key] = counted.get(key, 0.0) + number
    return counted


CLIENT_MAC = "02:00:00:77:00:02"


def spoofed(client: Worker, local: Worker, source: str, port: int) -> dict[str, float]:
    """Send one datagram to 10.77.0.1:``port`` from ``source`` (a raw socket in the client
    namespace); return how the counters moved once the daemon has received it (bounded)."""
    before = totals(local, "any")
    assert client.request({"spoof": ["10.77.0.1", port], "source": [source, 40000]}) == {"ok": True}
    end = time.monotonic() + EVENT_DEADLINE
    while True:
        after = totals(local, "any")
        # Received, and answered or dropped: both counters move before the next datagram.
        moved = {key: after[key] - before.get(key, 0.0) for key in after}
        if moved.get("received") == 1 and sum(moved.values()) == 2:
            return {key: number for key, number in moved.items() if number}
        if time.monotonic() > end:
            raise AssertionError(f"the datagram from {source} was not counted: {moved}")
        time.sleep(POLL_EVERY)


def test_a_subnet_broadcast_source_gets_no_reply_and_counts_as_reflection(
    write_config: WriteConfig,
) -> None:
    port = 5319
    config = write_config(
        f"listeners:\n  - {{name: any, interface: '*', port: {port}}}\n" + metrics_yaml()
    )
    with wired("udpbrd") as (server_ns, client_ns), ExitStack() as stack:
        plug(server_ns, client_ns, "vz0", "vz1", "10.77.0", broadcast=True)
        # Reverse-path filtering would drop a broadcast source as a martian before any socket
        # saw it (it is off in a new namespace, but may be inherited): off, the datagrams
        # reach the daemon and its guard alone has to refuse them.
        for conf in ("all", "default", "vz0"):
            ip("netns", "exec", server_ns, "sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0")
        # Replies to the spoofed sources that are answered go to the client namespace's MAC,
        # which drops them silently (not its address, no forwarding): no ARP that fails
        # seconds later and no ICMP error, either of which would count as a send error.
        ip("-n", server_ns, "route", "add", "default", "dev", "vz0")
        ip("-n", client_ns, "link", "set", "vz1", "address", CLIENT_MAC)
        for neighbour in ("10.77.0.7", "10.77.1.7", "10.77.1.255"):
            ip("-n", server_ns, "neigh", "replace", neighbour, "lladdr", CLIENT_MAC, "dev", "vz0",
               "nud", "permanent")  # fmt: skip
        assert "brd 10.77.0.255" in ip("-n", server_ns, "address", "show", "dev", "vz0")
        server = stack.enter_context(Server(server_ns, config))
        client = stack.enter_context(Worker(client_ns, CLIENT))
        local = stack.enter_context(Worker(server_ns, CLIENT))
        server.next("started")
        assert exchange(client, "10.77.0.1", port)["reply"] == "Your data was 14 bytes"

        # The same raw path from an ordinary address is answered; from the broadcast it is not.
        answered, refused = {"received": 1, "sent": 1}, {"received": 1, "reflection": 1}
        assert spoofed(client, local, "10.77.0.7", port) == answered
        assert spoofed(client, local, "10.77.0.255", port) == refused

        # A subnet added while running: its broadcast is refused from the event on, even
        # though the guard had answered (and remembered) that source before.
        assert spoofed(client, local, "10.77.1.255", port) == answered
        ip("-n", server_ns, "address", "add", "10.77.1.1/24", "brd", "+", "dev", "vz0")
        end = time.monotonic() + EVENT_DEADLINE
        while (moved := spoofed(client, local, "10.77.1.255", port)) != refused:
            # Judged before the daemon read the event: answered, which the kernel now refuses
            # itself (EACCES: a broadcast destination, and no SO_BROADCAST).
            assert moved in ({"received": 1, "sent": 1}, {"received": 1, "send_error": 1})
            assert time.monotonic() < end, "10.77.1.255 was never refused"
        assert spoofed(client, local, "10.77.1.7", port) == answered
        # And answered again once the address (and so its broadcast) is gone.
        ip("-n", server_ns, "address", "del", "10.77.1.1/24", "dev", "vz0")
        end = time.monotonic() + EVENT_DEADLINE
        while (moved := spoofed(client, local, "10.77.1.255", port)) != answered:
            assert moved == refused
            assert time.monotonic() < end, "10.77.1.255 was still refused"
        assert spoofed(client, local, "10.77.0.255", port) == refused
        assert exchange(client, "10.77.0.1", port)["reply"] == "Your data was 14 bytes"
        assert server.daemon.stop() == 0


# -- a new socket that clashes, and a failed one retried -------------------------------------


def test_a_new_binding_that_clashes_fails_alone_with_the_explanation(
    write_config: WriteConfig,
) -> None:
    require_netns()
    config = write_config(
        "listeners:\n"
        "  - {name: fixed, interface: 10.208.0.5, port: 5315, required: false}\n"
        "  - {name: ifc, interface: vb0, family: ipv4, port: 5315}\n"
        "  - {name: loop, interface: 127.0.0.1, port: 5315}\n" + metrics_yaml()
    )
    with (
        namespace([Veth("vb0", "vb1", ["10.208.0.1/24"])]) as ns,
        Server(ns, config) as server,
        Worker(ns, CLIENT) as client,
    ):
        server.next("started")
        server.mark()
        ip("-n", ns, "address", "add", "10.208.0.5/24", "dev", "vb0")
        failed = server.next("bind_failed", listener="ifc", socket="10.208.0.5:5315")
        assert failed["error"].startswith(
            "address already in use: clashes with listener 'fixed' (10.208.0.5:5315): "
            "both want exactly 10.208.0.5:5315"
        )
        assert failed["required"] is True
        assert failed["retry_seconds"] == 1.0
        # Only that socket: the daemon, and every other socket, serve on.
        for address in ("10.208.0.5", "10.208.0.1", "127.0.0.1"):
            assert exchange(client, address, 5315)["reply"] == "Your data was 14 bytes"
        assert states(client) == {
            ("fixed", "10.208.0.5:5315"): "bound",
            ("ifc", "10.208.0.1:5315"): "bound",
            ("ifc", "10.208.0.5:5315"): "failed",
            ("loop", "127.0.0.1:5315"): "bound",
        }
        # Retried with backoff, the same failure is not logged again and again.
        time.sleep(1.5)
        assert len(server.events_since_mark("bind_failed")) == 1
        assert server.daemon.stop() == 0


def test_a_failed_socket_is_retried_and_bound_once_its_port_is_free(
    write_config: WriteConfig,
) -> None:
    require_netns()
    config = write_config(
        "listeners:\n"
        "  - {name: contended, interface: 127.0.0.1, port: 5316, required: false}\n"
        "  - {name: loop, interface: 127.0.0.1, port: 5317}\n"
    )
    with namespace() as ns, Worker(ns, CLIENT) as client:
        assert client.request({"hold": ["127.0.0.1", 5316]}) == {"ok": True}
        with Server(ns, config) as server:
            failed = server.next("bind_failed", listener="contended")
            assert failed["errno"] == "EADDRINUSE"
            assert f"held by pid {client.pid}" in failed["error"]
            server.next("started")
            released = time.monotonic()
            assert client.request({"release": ["127.0.0.1", 5316]}) == {"ok": True}
            # Tried again 1 s after it failed, then 2 s later...: bound by the first retry.
            bound = server.next("listener_bound", listener="contended", deadline=5.0)
            assert bound["socket"] == "127.0.0.1:5316"
            assert time.monotonic() - released < 3.0
            assert exchange(client, "127.0.0.1", 5316)["reply"] == "Your data was 14 bytes"
            assert server.daemon.stop() == 0


def test_check_in_a_namespace_shows_what_waits() -> None:
    require_netns()
    with namespace([Veth("vb0", "vb1", ["10.209.0.1/24"])]) as ns:
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "udpbindd",
                "check",
                "-c",
                "/dev/stdin",
            ],
            input=(
                "listeners:\n"
                "  - {name: here, interface: 10.209.0.1, port: 5318}\n"
                "  - {name: later, interface: 10.209.0.9, port: 5318}\n"
                "  - {name: bcast, interface: 10.209.0.255, port: 5318}\n"
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[-1] for line in done.stdout.splitlines()[2:5]}
    # The subnet broadcast is on no interface's list, yet the kernel binds it: it is not waiting.
    assert rows == {"here": "ok", "later": "waiting", "bcast": "ok"}
    assert "waiting: listener 'later' (10.209.0.9:5318): no interface has the address" in (
        done.stdout
    )
