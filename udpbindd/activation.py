"""Socket activation: adopt the UDP sockets systemd passed (LISTEN_FDS), never re-binding them.

``parse_environment`` reads the variables (pure); ``inherited`` turns the passed fds into
``Inherited`` sockets with the socket name each is really bound to, and clears the variables
so that no child process ever sees them; ``assign`` decides (pure) which passed socket serves
which binding, and why each of the others serves none.

Matching: a socket whose FileDescriptorName is a listener's ``name`` is that listener's, and
serves whichever of its bindings has exactly the socket's name (address, port, device and
V6ONLY). Any other socket serves the binding with exactly its socket name, whatever listener
that is. systemd forbids ':' in FileDescriptorName=, and a listener's default name is its
socket name as written (``127.0.0.1:7``), so a listener matched by name needs an explicit
``name:``; matching by address works without one.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field

from udpbindd.expand import Binding
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


@dataclass(frozen=True, slots=True)
class Rejected:
    """A passed fd udpbindd cannot serve (not a bound UDP socket), and why."""

    fd: int
    fdname: str
    reason: str


@dataclass(frozen=True, slots=True)
class Unmatched:
    """A passed socket that serves no binding, and why, in words for an operator."""

    item: Inherited
    reason: str


@dataclass(slots=True)
class Assignment:
    """What ``assign`` decided: the passed socket for each binding it serves, and the rest."""

    adopted: dict[Binding, Inherited] = field(default_factory=dict)
    unmatched: list[Unmatched] = field(default_factory=list)


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
    """Adopt the sockets passed by the service manager and clear its variables.

    The variables are removed from ``environ`` (the process environment by default, which
    also unsets them for every child) even when they were meant for another process, as
    ``sd_listen_fds(1)`` does. Adopted sockets are non-blocking and close-on-exec.
    """
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


def assign(passed: Sequence[Inherited], bindings: Sequence[Binding]) -> Assignment:
    """Match passed sockets to bindings: by FileDescriptorName first, then by socket name.

    A socket named after a listener may serve only that listener, so it is placed before
    the unnamed ones can take the binding it is meant for. A binding is served by at most
    one socket; a second socket with the same name is unmatched.
    """
    listeners: dict[str, list[Binding]] = {}
    for binding in bindings:
        listeners.setdefault(binding.listener.name, []).append(binding)
    result = Assignment()
    taken: set[SocketName] = set()
    named = [item for item in passed if item.fdname in listeners]
    others = [item for item in passed if item.fdname not in listeners]
    for item in named + others:
        own = listeners.get(item.fdname)
        candidates = bindings if own is None else own
        exact = [binding for binding in candidates if binding.name == item.name]
        free = [binding for binding in exact if binding.name not in taken]
        if free:
            result.adopted[free[0]] = item
            taken.add(item.name)
            continue
        if exact:
            reason = f"another passed socket with this name already serves {_owner(exact[0])}"
        else:
            reason = _why_unmatched(
                item, candidates, named_for=None if own is None else item.fdname
            )
        result.unmatched.append(Unmatched(item, reason))
    return result


def _owner(binding: Binding) -> str:
    return f"listener {binding.listener.name!r} ({binding.name})"


def _why_unmatched(item: Inherited, candidates: Sequence[Binding], named_for: str | None) -> str:
    """Why no binding among ``candidates`` has exactly the socket name of ``item``."""
    name = item.name
    for binding in candidates:
        wanted = binding.name
        if (wanted.address, wanted.port, wanted.device) == (name.address, name.port, name.device):
            # Only [::] (and v4-mapped addresses) can differ in V6ONLY alone: it decides
            # whether the socket also receives IPv4, so it cannot be changed after bind().
            option = "ipv6-only" if wanted.v6only else "both"
            return (
                f"{name} is bound with IPV6_V6ONLY={int(name.v6only)} but {_owner(binding)} "
                f"wants IPV6_V6ONLY={int(wanted.v6only)}: set BindIPv6Only={option} in the "
                f".socket unit{' or family: dual on the listener' if wanted.v6only else ''}"
            )
    if named_for is not None:
        labels = ", ".join(str(binding.name) for binding in candidates)
        return (
            f"FileDescriptorName={named_for} names listener {named_for!r}, which binds "
            f"{labels}, not {name}"
        )
    reason = f"no listener binds {name}"
    if item.fdname:
        reason += f", and no listener is named {item.fdname!r}"
    return reason
