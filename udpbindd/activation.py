"""Socket activation: adopt the UDP sockets systemd passed (LISTEN_FDS), never re-binding them.

``parse_environment`` is pure; ``inherited`` turns the fds into ``Inherited`` sockets with the
socket name each is really bound to, and clears the variables so children never see them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from udpbindd.names import SocketName

SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PIDFDID")
_IFNAMSIZ = 16


@dataclass(frozen=True, slots=True)
class Passed:
    """One fd systemd passed, with its FileDescriptorName ("" when none was given)."""

    fd: int
    name: str


@dataclass(slots=True)
class Inherited:
    """A passed UDP socket and the socket name it is bound to."""

    sock: socket.socket
    fdname: str
    name: SocketName

    @property
    def inode(self) -> int:
        return os.fstat(self.sock.fileno()).st_ino


@dataclass(frozen=True, slots=True)
class Rejected:
    """A passed fd udpbindd cannot serve (not a bound UDP socket), and why."""

    fd: int
    fdname: str
    reason: str


def parse_environment(environ: Mapping[str, str], pid: int) -> list[Passed]:
    """The fds passed to process ``pid``; none when the variables are absent or for another pid."""
    if environ.get("LISTEN_PID", "") != str(pid):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = environ.get("LISTEN_FDNAMES", "")
    labels = names.split(":") if names else []
    return [
        Passed(SD_LISTEN_FDS_START + index, labels[index] if index < len(labels) else "")
        for index in range(max(count, 0))
    ]


def socket_name(sock: socket.socket) -> SocketName:
    """The socket name a bound UDP socket really has: address, port, device and V6ONLY."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, _IFNAMSIZ)
    device = raw.split(b"\0", 1)[0].decode(errors="replace")
    address = sock.getsockname()
    if sock.family == socket.AF_INET6:
        host, port, _, scope = address
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
        if ip.is_link_local and scope and not device:
            device = socket.if_indextoname(scope)
        v6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        return SocketName(ip, port, device, v6only)
    return SocketName(ipaddress.IPv4Address(address[0]), address[1], device)


def inherited(
    environ: MutableMapping[str, str] | None = None,
) -> tuple[list[Inherited], list[Rejected]]:
    """Adopt the sockets passed by the service manager and clear its variables."""
    env = os.environ if environ is None else environ
    passed = parse_environment(env, os.getpid())
    for variable in _VARIABLES:
        env.pop(variable, None)
    adopted: list[Inherited] = []
    rejected: list[Rejected] = []
    for item in passed:
        try:
            sock = socket.socket(fileno=item.fd)
        except OSError as error:
            rejected.append(Rejected(item.fd, item.name, f"not a socket: {error.strerror}"))
            continue
        if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            rejected.append(Rejected(item.fd, item.name, "not a UDP socket"))
            sock.close()
            continue
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
        name = socket_name(sock)
        if name.port == 0:
            rejected.append(Rejected(item.fd, item.name, "not bound to a port"))
            sock.close()
            continue
        adopted.append(Inherited(sock, item.name, name))
    return adopted, rejected
