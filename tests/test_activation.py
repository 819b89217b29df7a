"""Socket activation: which passed sockets udpbindd adopts, how it matches them, and serving them.

The pure parts (``parse_environment``, ``assign``) are tested directly. ``inherited`` runs in a
subprocess that puts real sockets on fds 3 and up, as a service manager would (doing that in
the pytest process would clobber its own fds). The daemon itself is started by
``systemd-socket-activate``, which binds the sockets, waits for the first datagram and then
execs udpbindd with them: the tests check that the first datagram is answered, that the
serving socket is the very one the tool bound (same inode, no second socket on the port), and
that unmatched and missing sockets are reported.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, free_port_both, require_tool
from daemonproc import DEADLINE, DaemonProcess, exchange

from udpbindd import host
from udpbindd.activation import Assignment, Inherited, Passed, assign, parse_environment
from udpbindd.config import parse_text
from udpbindd.expand import Binding, expand_all
from udpbindd.names import SocketName, label

REPO = Path(__file__).resolve().parents[1]

# -- parse_environment ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, [Passed(3, "")]),
        # Meant for another process (a child that inherited them): not ours.
        ({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, []),
        ({"LISTEN_FDS": "1"}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "-1"}, []),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}, []),
        (
            {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "dns:echo"},
            [Passed(3, "dns"), Passed(4, "echo")],
        ),
        # Fewer names than fds: the rest have none; extra names are ignored.
        (
            {"LISTEN_PID": "42", "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a"},
            [Passed(3, "a"), Passed(4, ""), Passed(5, "")],
        ),
        ({"LISTEN_PID": "42", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, [Passed(3, "a")]),
        # systemd's name for an unnamed fd in a list of names.
        (
            {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "unknown:b"},
            [Passed(3, "unknown"), Passed(4, "b")],
        ),
    ],
)
def test_parse_environment(environ: dict[str, str], expected: list[Passed]) -> None:
    assert parse_environment(environ, 42) == expected


# -- assign ----------------------------------------------------------------------------------


@pytest.fixture
def placeholder() -> Iterator[socket.socket]:
    """A socket for Inherited records in pure tests: ``assign`` never touches it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        yield sock


def bindings(text: str) -> list[Binding]:
    config = parse_text(text, "test.yaml")
    return list(expand_all(config.enabled_listeners, {}).bindings)


def passed(sock: socket.socket, fdname: str, address: str, port: int, **kw: Any) -> Inherited:
    return Inherited(sock, fdname, SocketName(ip_address(address), port, **kw))


def served(result: Assignment) -> dict[str, tuple[str, str]]:
    """binding label -> (listener name, fdname) of the socket that serves it."""
    return {
        label(binding.name): (binding.listener.name, item.fdname)
        for binding, item in result.adopted.items()
    }


def test_assign_by_name_and_by_address(placeholder: socket.socket) -> None:
    wanted = bindings(
        """
listeners:
  - {name: dns, interface: 127.0.0.1, port: 53}
  - {interface: 127.0.0.1, port: 1060}
  - {name: six, interface: "::1", port: 1060}
"""
    )
    result = assign(
        [
            passed(placeholder, "dns", "127.0.0.1", 53),
            # systemd names an fd after its .socket unit unless told otherwise.
            passed(placeholder, "udpbindd.socket", "127.0.0.1", 1060),
            passed(placeholder, "", "::1", 1060, v6only=True),
        ],
        wanted,
    )
    assert served(result) == {
        "127.0.0.1:53": ("dns", "dns"),
        "127.0.0.1:1060": ("127.0.0.1:1060", "udpbindd.socket"),
        "[::1]:1060": ("six", ""),
    }
    assert result.unmatched == []


def test_assign_a_named_socket_first_even_when_passed_last(placeholder: socket.socket) -> None:
    wanted = bindings("listeners: [{name: echo, interface: 127.0.0.1, port: 7}]")
    anonymous = passed(placeholder, "", "127.0.0.1", 7)
    named = passed(placeholder, "echo", "127.0.0.1", 7)
    result = assign([anonymous, named], wanted)
    assert list(result.adopted.values()) == [named]
    [unmatched] = result.unmatched
    assert unmatched.item is anonymous
    assert unmatched.reason == (
        "another passed socket with this name already serves listener 'echo' (127.0.0.1:7)"
    )


def test_assign_a_socket_named_for_a_listener_serves_only_that_listener(
    placeholder: socket.socket,
) -> None:
    wanted = bindings(
        """
listeners:
  - {name: a, interface: 127.0.0.1, port: 7000}
  - {name: b, interface: 127.0.0.1, port: 7001}
"""
    )
    # Named for "a" but bound where "b" listens: the name is a promise the address breaks.
    result = assign([passed(placeholder, "a", "127.0.0.1", 7001)], wanted)
    assert result.adopted == {}
    [unmatched] = result.unmatched
    assert unmatched.reason == (
        "FileDescriptorName=a names listener 'a', which binds 127.0.0.1:7000, not 127.0.0.1:7001"
    )


def test_assign_reports_a_socket_no_listener_wants(placeholder: socket.socket) -> None:
    wanted = bindings("listeners: [{name: a, interface: 127.0.0.1, port: 7000}]")
    result = assign(
        [
            passed(placeholder, "stray", "127.0.0.1", 7002),
            passed(placeholder, "", "127.0.0.2", 7000),
            # The device is part of the socket name: lo-bound is another socket.
            passed(placeholder, "", "127.0.0.1", 7000, device="lo"),
        ],
        wanted,
    )
    assert result.adopted == {}
    assert [u.reason for u in result.unmatched] == [
        "no listener binds 127.0.0.1:7002, and no listener is named 'stray'",
        "no listener binds 127.0.0.2:7000",
        "no listener binds 127.0.0.1:7000%lo",
    ]


@pytest.mark.parametrize(
    ("listener", "passed_v6only", "hint"),
    [
        # "*" wants [::] IPv6 only; a .socket unit's [::] follows bindv6only (0: dual-stack).
        ('{name: any, interface: "*", port: 53}', False, "BindIPv6Only=ipv6-only"),
        ('{name: any, interface: "::", port: 53, family: dual}', True, "BindIPv6Only=both"),
    ],
)
def test_assign_refuses_a_wildcard_with_the_other_v6only(
    placeholder: socket.socket, listener: str, passed_v6only: bool, hint: str
) -> None:
    wanted = bindings(f"listeners: [{listener}]")
    result = assign([passed(placeholder, "any", "::", 53, v6only=passed_v6only)], wanted)
    assert result.adopted == {}
    [unmatched] = result.unmatched
    assert f"IPV6_V6ONLY={int(passed_v6only)} but listener 'any'" in unmatched.reason
    assert hint in unmatched.reason


# -- inherited(): real fds, in a subprocess --------------------------------------------------

# Puts a UDP/IPv4, a UDP/IPv6, a TCP, an unbound UDP socket and a pipe on fds 3..7, sets the
# variables (LISTEN_PID = this process, or another when argv[1] says so), calls inherited(),
# and prints what it adopted, what it rejected, and what is left of the variables in its own
# environment and in a child's.
INHERIT_SCRIPT = r"""
import fcntl, json, os, socket, subprocess, sys
from udpbindd import activation

udp4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp4.bind(("127.0.0.1", 0))
udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp6.bind(("::1", 0))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.bind(("127.0.0.1", 0))
unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
read_end, write_end = os.pipe()
ports = [udp4.getsockname()[1], udp6.getsockname()[1]]
sources = [udp4.detach(), udp6.detach(), tcp.detach(), unbound.detach(), read_end]
# Out of the way first: a source may already sit on one of the target fds.
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for target, fd in enumerate(high, start=3):
    os.dup2(fd, target)  # dup2 makes the copy inheritable, as a service manager passes it
    os.close(fd)
os.environ.update(
    LISTEN_PID=str(os.getpid() if sys.argv[1] == "mine" else 1),
    LISTEN_FDS=str(len(high)),
    LISTEN_FDNAMES="four:six:tcp:unbound:pipe",
    LISTEN_PIDFDID="12345",
)
adopted, rejected = activation.inherited()
child = subprocess.run(["env"], capture_output=True, text=True, check=True).stdout
still_open = []
for fd in range(3, 8):
    try:
        os.fstat(fd)
        still_open.append(fd)
    except OSError:
        pass
print(json.dumps({
    "ports": ports,
    "adopted": [
        [item.fdname, str(item.name), item.sock.fileno(), os.get_inheritable(item.sock.fileno()),
         item.sock.getblocking()]
        for item in adopted
    ],
    "rejected": [[item.fd, item.fdname, item.reason] for item in rejected],
    "own": sorted(key for key in os.environ if key.startswith("LISTEN_")),
    "child": sorted(line.partition("=")[0] for line in child.splitlines() if "LISTEN_" in line),
    "open": still_open,
}))
for item in adopted:
    item.sock.close()
os.close(write_end)
"""


def run_inherit(whose: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", INHERIT_SCRIPT, whose],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_inherited_adopts_bound_udp_sockets_and_clears_the_variables() -> None:
    result = run_inherit("mine")
    four, six = result["ports"]
    assert result["adopted"] == [
        # Same fd, no longer inheritable (close-on-exec), non-blocking for the loop.
        ["four", f"127.0.0.1:{four}", 3, False, False],
        ["six", f"[::1]:{six}", 4, False, False],
    ]
    assert [fd for fd, _, _ in result["rejected"]] == [5, 6, 7]
    reasons = {name: reason for _, name, reason in result["rejected"]}
    assert reasons["tcp"] == "not a UDP socket"
    assert reasons["unbound"] == "not bound to a port"
    assert reasons["pipe"].startswith("not a socket")
    # Rejected sockets are closed; the pipe is not udpbindd's to close.
    assert result["open"] == [3, 4, 7]
    assert result["own"] == []
    assert result["child"] == []


def test_inherited_ignores_fds_meant_for_another_process_but_still_clears_the_variables() -> None:
    result = run_inherit("other")
    assert result["adopted"] == []
    assert result["rejected"] == []
    assert result["open"] == [3, 4, 5, 6, 7]  # untouched
    assert result["own"] == []
    assert result["child"] == []


# -- the daemon under systemd-socket-activate ------------------------------------------------


@pytest.fixture(scope="module")
def socket_activate() -> str:
    return require_tool("systemd-socket-activate")


def activated(
    tool: str, config: Path, listen: list[str], fdnames: list[str] | None = None
) -> DaemonProcess:
    prefix = [tool, "--datagram", *(f"--listen={address}" for address in listen)]
    if fdnames is not None:
        prefix.append(f"--fdname={':'.join(fdnames)}")
    # The tool passes only LISTEN_* and a few variables of its own to what it execs.
    return DaemonProcess(config, prefix=tuple(prefix), args=("--log-format", "json"))


def sockets_on(port: int) -> list[host.HeldSocket]:
    return [held for held in host.held_sockets() if held.name.port == port]


def wait_bound(port: int, count: int, pid: int) -> list[host.HeldSocket]:
    """The ``count`` sockets on ``port`` once ``pid`` holds them all (bounded)."""
    end = time.monotonic() + DEADLINE
    while True:
        found = sockets_on(port)
        if len(found) == count and all(h.owner and h.owner.pid == pid for h in found):
            return found
        if time.monotonic() > end:
            raise TimeoutError(f"port {port}: {found}, not {count} socket(s) held by {pid}")
        time.sleep(0.02)


def first_exchange(host_: str, port: int) -> tuple[bytes, bytes]:
    """Send numbered datagrams until one is not refused; return it and the reply it got.

    A refused datagram (nothing bound yet) is gone; one that is not refused is queued for
    whoever reads the socket, which must answer that very datagram.
    """
    family = socket.AF_INET6 if ":" in host_ else socket.AF_INET
    end = time.monotonic() + DEADLINE
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host_, port))
        for attempt in range(1, 1000):
            payload = f"first datagram, attempt {attempt}".encode()
            sock.send(payload)
            sock.settimeout(max(0.01, end - time.monotonic()))
            try:
                return payload, sock.recv(65536)
            except ConnectionRefusedError:
                if time.monotonic() > end:
                    break
                time.sleep(0.05)
            except TimeoutError:
                break
    raise TimeoutError(f"no answer from {host_}:{port} within {DEADLINE} s")


def distinct_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in daemon.events if event.get("event") == name]


def test_activated_by_name_serves_the_passed_sockets_and_binds_no_other(
    socket_activate: str, write_config: Any
) -> None:
    port = free_port_both()
    config = write_config(
        f"""
listeners:
  - {{name: four, interface: 127.0.0.1, port: {port}, responder: echo}}
  - {{name: six, interface: "::1", port: {port}, responder: echo}}
metrics: {{listen: []}}
"""
    )
    listen = [f"127.0.0.1:{port}", f"[::1]:{port}"]
    with activated(socket_activate, config, listen, ["four", "six"]) as daemon:
        # The tool's own sockets, before anything is sent: the daemon must serve these.
        before = {held.name: held.inode for held in wait_bound(port, 2, daemon.pid)}
        payload, reply = first_exchange("127.0.0.1", port)
        assert reply == payload
        assert exchange("::1", port, b"six") == b"six"
        daemon.wait_for_event("started")
        after = {held.name: held.inode for held in wait_bound(port, 2, daemon.pid)}
        assert after == before
        inherited = events(daemon, "listener_inherited")
        assert sorted((e["listener"], e["fdname"], e["matched_by"]) for e in inherited) == [
            ("four", "four", "name"),
            ("six", "six", "name"),
        ]
        assert all(e["inherited"] for e in events(daemon, "listener_bound"))
        assert events(daemon, "inherited_unmatched") == []
        assert events(daemon, "listener_not_inherited") == []
        assert daemon.stop() == 0


def test_activated_by_address_with_default_listener_names(
    socket_activate: str, write_config: Any
) -> None:
    port = free_port()
    config = write_config(
        f"listeners: [{{interface: 127.0.0.1, port: {port}, responder: echo}}]\n"
        "metrics: {listen: []}\n"
    )
    # No --fdname: LISTEN_FDNAMES is not set at all.
    with activated(socket_activate, config, [f"127.0.0.1:{port}"]) as daemon:
        [before] = wait_bound(port, 1, daemon.pid)
        payload, reply = first_exchange("127.0.0.1", port)
        assert reply == payload
        daemon.wait_for_event("started")
        [after] = wait_bound(port, 1, daemon.pid)
        assert after.inode == before.inode
        [event] = events(daemon, "listener_inherited")
        assert (event["listener"], event["fdname"], event["matched_by"]) == (
            f"127.0.0.1:{port}",
            "",
            "address",
        )
        assert daemon.stop() == 0


def test_activated_reports_unmatched_sockets_and_binds_listeners_not_passed(
    socket_activate: str, write_config: Any
) -> None:
    served_port, stray_port, misnamed_port, unpassed_port = distinct_ports(4)
    config = write_config(
        f"""
listeners:
  - {{name: a, interface: 127.0.0.1, port: {served_port}, responder: echo}}
  - {{name: b, interface: 127.0.0.1, port: {unpassed_port}, responder: echo}}
metrics: {{listen: []}}
"""
    )
    listen = [f"127.0.0.1:{p}" for p in (served_port, stray_port, misnamed_port)]
    with activated(socket_activate, config, listen, ["a", "stray", "b"]) as daemon:
        wait_bound(stray_port, 1, daemon.pid)
        payload, reply = first_exchange("127.0.0.1", served_port)
        assert reply == payload
        daemon.wait_for_event("started")
        unmatched = {e["fdname"]: e for e in events(daemon, "inherited_unmatched")}
        assert unmatched.keys() == {"stray", "b"}
        assert unmatched["stray"]["socket"] == f"127.0.0.1:{stray_port}"
        assert f"no listener binds 127.0.0.1:{stray_port}" in unmatched["stray"]["detail"]
        assert (
            f"names listener 'b', which binds 127.0.0.1:{unpassed_port}, not "
            f"127.0.0.1:{misnamed_port}" in unmatched["b"]["detail"]
        )
        [missing] = events(daemon, "listener_not_inherited")
        assert (missing["listener"], missing["socket"]) == ("b", f"127.0.0.1:{unpassed_port}")
        # Unmatched sockets are closed; the listener that was not passed is bound by udpbindd.
        assert sockets_on(stray_port) == []
        assert sockets_on(misnamed_port) == []
        assert exchange("127.0.0.1", stray_port, b"x", timeout=0.5) is None
        wait_bound(unpassed_port, 1, daemon.pid)
        assert exchange("127.0.0.1", unpassed_port, b"b") == b"b"
        assert daemon.stop() == 0


def test_activated_dual_stack_socket_for_an_ipv6_only_listener_is_replaced(
    socket_activate: str, write_config: Any
) -> None:
    port = free_port_both()
    config = write_config(
        f'listeners: [{{name: any6, interface: "::", port: {port}, responder: echo}}]\n'
        "metrics: {listen: []}\n"
    )
    # The tool binds [::] dual-stack (net.ipv6.bindv6only=0); the listener asks IPv6 only.
    with activated(socket_activate, config, [f"[::]:{port}"], ["any6"]) as daemon:
        [passed_socket] = wait_bound(port, 1, daemon.pid)
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"wake up", ("::1", port))
        daemon.wait_for_event("started")
        [event] = events(daemon, "inherited_unmatched")
        assert "IPV6_V6ONLY=0 but listener 'any6'" in event["detail"]
        assert "BindIPv6Only=ipv6-only" in event["detail"]
        # Closed before binding, so the listener could bind the name itself, as it asked.
        [own] = wait_bound(port, 1, daemon.pid)
        assert own.inode != passed_socket.inode
        assert own.exact, "sock_diag is needed to read V6ONLY"
        assert own.name.v6only
        assert exchange("::1", port, b"six") == b"six"
        assert exchange("127.0.0.1", port, b"four", timeout=0.5) is None
        assert daemon.stop() == 0
