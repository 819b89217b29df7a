"""The classic scenario end to end, on two hosts made of network namespaces joined by a veth.

The server host has ``lo`` and an "external" interface with 10.201.7.1; the client host, in a
second namespace, has 10.201.7.2 on the other end of the wire. The lesson: a server bound to
the external address answers the network but refuses 127.0.0.1; a loopback listener and an
external one share a port; a wildcard on that port clashes with both, which ``check``
explains and ``run`` refuses before binding anything. All traffic stays inside the two
namespaces, which are deleted by name afterwards.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import require_root, require_tool
from daemonproc import DaemonProcess, plain_lines
from netns import Veth, ip, namespace

pytestmark = pytest.mark.netns

SERVER_IP = "10.201.7.1"
CLIENT_IP = "10.201.7.2"
PORT = 1060
MESSAGE = "This is another message"
WriteConfig = Callable[[str], Path]

LOOPBACK = f"  - {{name: loopback, interface: 127.0.0.1, port: {PORT}, responder: size}}\n"
EXTERNAL = f"  - {{name: external, interface: {SERVER_IP}, port: {PORT}, responder: echo}}\n"
WILDCARD = f'  - {{name: everywhere, interface: "*", port: {PORT}}}\n'


@pytest.fixture
def hosts() -> Iterator[tuple[str, str]]:
    """(server namespace, client namespace), wired together by one veth pair."""
    require_root()
    require_tool("ip")
    veth = Veth("ext0", "ext1", addresses=[f"{SERVER_IP}/24"])
    with namespace([veth], prefix="udpsrv") as server, namespace(prefix="udpcli") as client:
        # Moving the peer end makes it the client host's interface; it arrives down and bare.
        ip("-n", server, "link", "set", "ext1", "netns", client)
        ip("-n", client, "address", "add", f"{CLIENT_IP}/24", "dev", "ext1")
        ip("-n", client, "link", "set", "ext1", "up")
        yield server, client


def udpbindd(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m udpbindd ARGS`` inside namespace ``ns`` (bounded)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "udpbindd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def daemon_in(ns: str, config: Path) -> DaemonProcess:
    return DaemonProcess(config, prefix=("ip", "netns", "exec", ns))


def probe_ok(ns: str, host: str, expected_reply: str) -> str:
    """Probe host:PORT from namespace ``ns``; return the client address the probe used."""
    done = udpbindd(ns, "probe", host, str(PORT))
    assert done.returncode == 0, done.stderr
    client_line, reply_line = done.stdout.splitlines()
    assert reply_line == (
        f"reply from {host}:{PORT} ({len(expected_reply)} bytes): {expected_reply}"
    )
    prefix = "client socket name is "
    assert client_line.startswith(prefix)
    return client_line.removeprefix(prefix).rpartition(":")[0]


def udp_ports_bound(ns: str) -> set[int]:
    """The local ports of every UDP socket in namespace ``ns`` (its /proc/net/udp)."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "cat", "/proc/net/udp", "/proc/net/udp6"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    rows = [line.split() for line in done.stdout.splitlines()]
    return {int(row[1].rpartition(":")[2], 16) for row in rows if row and row[0] != "sl"}


def comm_of(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_external_listener_answers_the_network_and_refuses_loopback(
    hosts: tuple[str, str], write_config: WriteConfig
) -> None:
    server, client = hosts
    config = write_config(
        f"listeners:\n  - {{name: external, interface: {SERVER_IP}, port: {PORT}}}\n"
    )
    with daemon_in(server, config) as daemon:
        bound = daemon.wait_for_event("listener_bound")
        assert bound["socket"] == f"{SERVER_IP}:{PORT}"
        daemon.wait_for_event("started")
        size_reply = f"Your data was {len(MESSAGE)} bytes"
        # Another host reaches it through the wire...
        assert probe_ok(client, SERVER_IP, size_reply) == CLIENT_IP
        # ...and so does this host, when it sends to the external address...
        assert probe_ok(server, SERVER_IP, size_reply) == SERVER_IP
        # ...but 127.0.0.1 is another address: nothing listens there, and the kernel says so.
        refused = udpbindd(server, "probe", "127.0.0.1", str(PORT))
        assert refused.returncode == 1
        assert refused.stderr == (
            f"udpbindd probe: 127.0.0.1:{PORT} refused the datagram (ICMP port unreachable): "
            "nothing is listening on that address and port\n"
        )
        assert refused.stdout.startswith("client socket name is 127.0.0.1:")
        assert daemon.stop() == 0
    assert PORT not in udp_ports_bound(server)


def test_loopback_and_external_listeners_share_the_port(
    hosts: tuple[str, str], write_config: WriteConfig
) -> None:
    server, client = hosts
    config = write_config(f"listeners:\n{LOOPBACK}{EXTERNAL}")
    with daemon_in(server, config) as daemon:
        daemon.wait_for_event("started")
        # Different responders show which of the two sockets answered.
        assert probe_ok(server, "127.0.0.1", f"Your data was {len(MESSAGE)} bytes") == ("127.0.0.1")
        assert probe_ok(client, SERVER_IP, MESSAGE) == CLIENT_IP
        bound = sorted(e["socket"] for e in daemon.events if e["event"] == "listener_bound")
        assert bound == [f"{SERVER_IP}:{PORT}", f"127.0.0.1:{PORT}"]
        assert daemon.stop() == 0


def test_a_wildcard_on_the_shared_port_is_refused_before_anything_is_bound(
    hosts: tuple[str, str], write_config: WriteConfig
) -> None:
    server, _ = hosts
    config = write_config(f"listeners:\n{LOOPBACK}{EXTERNAL}{WILDCARD}")

    checked = udpbindd(server, "check", "-c", str(config))
    assert checked.returncode == 1
    report = checked.stdout
    # The wildcard meets whichever of the two the kernel would find first; either explains it.
    other = re.search(r"clashes with listener '(loopback|external)'", report)
    assert other is not None, report
    address = {"loopback": "127.0.0.1", "external": SERVER_IP}[other.group(1)]
    assert (
        f"clash: listener 'everywhere' (0.0.0.0:{PORT}) clashes with listener "
        f"'{other.group(1)}' ({address}:{PORT})\n"
        f"  why: 0.0.0.0:{PORT} receives on every IPv4 address, including {address};"
    ) in report
    assert "  fix: list the specific addresses instead of the wildcard" in report
    assert report.endswith("1 clash(es) found\n")
    assert PORT not in udp_ports_bound(server)

    daemon = daemon_in(server, config)
    with daemon:
        assert daemon.wait(timeout=60) == 1
    (line,) = plain_lines(daemon.stderr)
    assert line.startswith(
        f"udpbindd: cannot bind listener 'everywhere' (0.0.0.0:{PORT}): address already in "
        f"use: clashes with listener '{other.group(1)}' ({address}:{PORT}): 0.0.0.0:{PORT} "
        f"receives on every IPv4 address, including {address}"
    )
    # Refused before binding: not even the two listeners that could share the port were bound.
    assert [e for e in daemon.events if e["event"] in ("listener_bound", "started")] == []
    assert PORT not in udp_ports_bound(server)


def test_another_process_holding_the_port_is_named(
    hosts: tuple[str, str], write_config: WriteConfig
) -> None:
    server, client = hosts
    holder_config = write_config(f"listeners:\n{LOOPBACK}{EXTERNAL}")
    wildcard_config = write_config(f"listeners:\n{WILDCARD}")
    with daemon_in(server, holder_config) as holder:
        holder.wait_for_event("started")
        pid, command = holder.pid, comm_of(holder.pid)

        checked = udpbindd(server, "check", "-c", str(wildcard_config))
        assert checked.returncode == 1
        assert f"held by pid {pid} ({command})" in checked.stdout
        assert f"fix: stop pid {pid} ({command})" in checked.stdout

        as_json = udpbindd(server, "check", "-c", str(wildcard_config), "--format", "json")
        assert as_json.returncode == 1
        holders = {
            (clash["with"]["kind"], clash["with"]["pid"], clash["with"]["command"])
            for clash in json.loads(as_json.stdout)["clashes"]
        }
        assert holders == {("process", pid, command)}

        refused = daemon_in(server, wildcard_config)
        with refused:
            assert refused.wait(timeout=60) == 1
        (line,) = plain_lines(refused.stderr)
        assert line.startswith(f"udpbindd: cannot bind listener 'everywhere' (0.0.0.0:{PORT})")
        assert f"held by pid {pid} ({command})" in line
        assert [e for e in refused.events if e["event"] == "listener_bound"] == []

        # The holder never noticed: it still serves both of its sockets.
        assert probe_ok(client, SERVER_IP, MESSAGE) == CLIENT_IP
        assert holder.stop() == 0
