"""The only place listener sockets are created: open a bound, non-blocking UDP socket.

Sets every option before bind() (IPV6_V6ONLY always explicitly; never SO_REUSEADDR), reads
back the receive buffer the kernel granted, and turns errno into a ``BindError`` that says
what it means for an operator. Also owns the per-datagram socket features the loop relies on:
packet info, so a wildcard socket answers from the address each request was sent to, and the
error queue, where ICMP errors about replies are read. Knows nothing of YAML, metrics or the
loop.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from dataclasses import dataclass

from udpbindd.names import SocketName

# A peer as recvfrom gives it: (host, port), or (host, port, flowinfo, scope_id) for IPv6.
Address = tuple[str, int] | tuple[str, int, int, int]
# Python 3.11's socket module lacks these Linux constants.
IP_FREEBIND = 15
IP_PKTINFO = 8
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
SO_RCVBUFFORCE = 33
SO_MEMINFO = 55
_SK_MEMINFO_DROPS = 8  # index of SK_MEMINFO_DROPS in the SO_MEMINFO u32 array
_MEMINFO_WORDS = 9
_INT_MAX = 2**31 - 1
# Room for one in_pktinfo (12 bytes) or in6_pktinfo (20 bytes) control message, the only one a
# listener socket is asked for.
PKTINFO_SPACE = socket.CMSG_SPACE(20)
# The first 12 bytes of a v4-mapped IPv6 address (::ffff:0:0/96).
_V4_MAPPED = bytes(10) + b"\xff\xff"
# One IP_RECVERR/IPV6_RECVERR message: sock_extended_err (16 bytes) and the offender's address.
_ERROR_SPACE = socket.CMSG_SPACE(16 + 28)
_ERROR_MESSAGES = frozenset({(socket.SOL_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)})
# What an ICMP error about an earlier reply turns into (icmp_err_convert, icmpv6_err_convert).
# The next send from the socket fails with it once, though its own datagram is fine.
ICMP_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.ENOPROTOOPT,
        errno.EOPNOTSUPP,
        errno.EMSGSIZE,
        errno.EACCES,
        errno.EPROTO,
    }
)

_MEANINGS = {
    errno.EADDRINUSE: "address already in use: another socket already covers this socket name",
    errno.EADDRNOTAVAIL: (
        "address not available: no interface of this host has it (freebind: true binds anyway)"
    ),
    errno.EACCES: "permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE",
    errno.EPERM: "operation not permitted: this option needs a capability the process lacks",
    errno.ENODEV: "no such device",
    errno.EINVAL: "invalid argument: the kernel refuses this combination of address and options",
}


class BindError(Exception):
    """A socket could not be opened or bound; ``errno`` and ``step`` say where and why."""

    def __init__(self, name: SocketName, code: int, step: str) -> None:
        self.name = name
        self.errno = code
        self.step = step
        self.errno_name = errno.errorcode.get(code, str(code))
        super().__init__(f"{name}: {step}: {self.meaning}")

    @property
    def meaning(self) -> str:
        return _MEANINGS.get(self.errno, f"{self.errno_name}")


@dataclass(frozen=True, slots=True)
class Options:
    """Socket options that need a new socket to change."""

    reuse_port: bool = False
    freebind: bool = False
    recv_buffer: int = 0  # 0: leave the kernel default


def sockaddr(name: SocketName) -> tuple[str, int] | tuple[str, int, int, int]:
    """The address tuple bind() takes; a link-local address carries its zone's index."""
    if name.family == 4:
        return (str(name.address), name.port)
    scope = socket.if_nametoindex(name.device) if name.is_link_local else 0
    return (str(name.address), name.port, 0, scope)


def open_udp(name: SocketName, options: Options) -> tuple[socket.socket, int]:
    """Create, configure and bind one UDP socket; return it with its granted receive buffer.

    Raises:
        BindError: the kernel refused a step; the socket is closed.
    """
    family = socket.AF_INET if name.family == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    step = "socket options"
    try:
        if family == socket.AF_INET6:
            # Set explicitly so behaviour never depends on net.ipv6.bindv6only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(name.v6only))
        if options.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if options.freebind:
            # IP_FREEBIND at SOL_IP also applies to AF_INET6 sockets.
            sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if name.device and not name.is_link_local:
            step = f"binding to device {name.device}"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.device.encode())
        granted = set_receive_buffer(sock, options.recv_buffer)
        enable_error_queue(sock)
        if name.is_wildcard:
            enable_pktinfo(sock)
        step = "bind"
        if name.is_link_local:
            step = f"looking up zone {name.device}"
            address = sockaddr(name)
            step = "bind"
        else:
            address = sockaddr(name)
        sock.bind(address)
    except OSError as error:
        sock.close()
        # if_nametoindex raises an OSError without errno when the zone's interface is absent.
        code = error.errno if error.errno is not None else errno.ENODEV
        raise BindError(name, code, step) from None
    return sock, granted


def set_receive_buffer(sock: socket.socket, requested: int) -> int:
    """Ask for ``requested`` bytes of receive buffer and return what the kernel granted.

    SO_RCVBUF is capped silently at net.core.rmem_max; with CAP_NET_ADMIN, SO_RCVBUFFORCE
    lifts the cap, so it is tried when the plain request fell short.
    """
    if requested > 0:
        # The kernel doubles the request for its bookkeeping and reports the doubled value, so
        # a request granted in full reads back as twice its size (capped at INT_MAX / 2 first).
        in_full = 2 * min(requested, _INT_MAX // 2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, requested)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < in_full:
            # Without CAP_NET_ADMIN the grant stays what SO_RCVBUF gave; callers report it.
            with contextlib.suppress(PermissionError):
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, requested)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def enable_pktinfo(sock: socket.socket) -> None:
    """Ask for each datagram's destination address (IP_PKTINFO, IPV6_RECVPKTINFO).

    A wildcard socket needs it to answer from the address a request was sent to: left to
    routing, the reply may leave from another address of the host, and a client that
    connected to the address it sent to discards it. A dual-stack socket reports its IPv4
    datagrams as IPV6_PKTINFO with v4-mapped addresses.
    """
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)


def enable_error_queue(sock: socket.socket) -> None:
    """Have ICMP errors about replies reported on the socket (IP_RECVERR, IPV6_RECVERR).

    Without it Linux drops them silently for sockets that are not connected: a reply to a
    closed port, or one a router refused, would look sent. With it, each error is queued
    (``read_error_queue`` takes them) and reported once by the next receive or send.
    Failed sends that the kernel would otherwise hide (ENOBUFS) are reported too.
    """
    # IP_RECVERR on an IPv6 socket covers the IPv4 peers of a dual-stack one.
    sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)


def read_error_queue(sock: socket.socket, limit: int) -> int:
    """Take up to ``limit`` errors off the socket's error queue; return how many were ICMP.

    Errors of local origin are not counted: the send they belong to failed and was counted.
    Emptying the queue matters: while it holds anything the socket polls as ready.
    """
    icmp = 0
    for _ in range(limit):
        try:
            _, ancillary, _, _ = sock.recvmsg(0, _ERROR_SPACE, socket.MSG_ERRQUEUE)
        except OSError:  # EAGAIN: the queue is empty
            break
        for level, kind, data in ancillary:
            # struct sock_extended_err {u32 ee_errno; u8 ee_origin; ...}
            if (level, kind) in _ERROR_MESSAGES and len(data) > 4:
                icmp += data[4] in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6)
    return icmp


def reply_source(
    ancillary: list[tuple[int, int, bytes]],
) -> list[tuple[int, int, bytes]]:
    """The control message for ``sendmsg`` that makes a reply leave from the address its
    request (received with ``ancillary``) was sent to; [] when it carried no packet info.

    IPv4 (and v4-mapped) replies keep the local address but not the interface: the route
    back to a client need not leave through the interface its request came in on, so the
    kernel picks it. An IPv6 reply keeps both, as the batched path does: a link-local
    source is only meaningful with its interface. (For IPv4 the kernel reports a local
    address as ``ipi_spec_dst`` even when the request went to a broadcast address.)
    """
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo {int ipi_ifindex; in_addr ipi_spec_dst; in_addr ipi_addr}:
            # sendmsg takes ipi_spec_dst as the source address.
            return [(level, kind, bytes(4) + data[4:12])]
        if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo {in6_addr ipi6_addr; int ipi6_ifindex}
            if data[0] == 0xFF:
                # Sent to a multicast group: no reply can come from that; the kernel picks.
                return []
            if data[:12] == _V4_MAPPED:
                # A dual-stack socket reports the IPv4 header's destination, not a local
                # address: for multicast (224/4) and 255.255.255.255 the kernel picks.
                return [] if data[12] >= 224 else [(level, kind, data[:16] + bytes(4))]
            return [(level, kind, data[:20])]
    return []


def kernel_drops(sock: socket.socket) -> int | None:
    """The kernel's count of datagrams dropped on this socket (a full receive queue)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * _MEMINFO_WORDS)
    except OSError:
        return None
    if len(raw) < 4 * (_SK_MEMINFO_DROPS + 1):
        return None
    return int(struct.unpack_from("=I", raw, 4 * _SK_MEMINFO_DROPS)[0])
