"""Netlink plumbing: dump requests over NETLINK_ROUTE and NETLINK_SOCK_DIAG, and pure parsers.

The parsers turn raw netlink bytes into frozen dataclasses, whatever socket they came from, so
a dump, a multicast subscription in the daemon's loop and a test's crafted bytes share one path.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import os
import socket
import struct
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

# Protocols (linux/netlink.h). The socket module does not export NETLINK_SOCK_DIAG.
NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4

# Message types below NLMSG_MIN_TYPE are netlink's own control messages.
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4

NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH

# rtnetlink message types (linux/rtnetlink.h).
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22

# Multicast groups for bind(); the daemon subscribes to these for interface changes.
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100

# sock_diag (linux/sock_diag.h, linux/inet_diag.h). Its one message type shares the value 20
# with RTM_NEWADDR, so decoding always needs the protocol the bytes came from.
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_SKMEMINFO = 7
INET_DIAG_SKV6ONLY = 11
SK_MEMINFO_DROPS = 8
DIAG_ALL_STATES = 0xFFFFFFFF

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_BROADCAST = 4
IFA_FLAGS = 8

IFA_F_SECONDARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_OPTIMISTIC = 0x04
IFA_F_DADFAILED = 0x08
IFA_F_DEPRECATED = 0x20
IFA_F_TENTATIVE = 0x40
IFA_F_PERMANENT = 0x80

IFLA_IFNAME = 3

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFF_LOWER_UP = 0x10000

RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254

# The attribute type field carries two flag bits that are not part of the type.
NLA_TYPE_MASK = 0x3FFF

# The kernel never builds a dump message larger than 32 KiB (netlink_dump), so a 64 KiB
# buffer cannot truncate one; MSG_TRUNC is still checked in case that ever changes.
RECV_BUFFER = 65536
DEFAULT_TIMEOUT = 5.0
MAX_DUMP_BYTES = 256 * 1024 * 1024
DUMP_ATTEMPTS = 3

_NLMSGHDR = struct.Struct("=IHHII")
_RTATTR = struct.Struct("=HH")
_IFADDRMSG = struct.Struct("=BBBBI")
_IFINFOMSG = struct.Struct("=BxHiII")
_NLMSGERR = struct.Struct("=i")
_INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48s")
# inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid (ports and addresses in
# network order, the interface index and cookie in host order), then expires, rqueue, wqueue,
# uid and inode.
_INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIIIIIIII")
_U32 = struct.Struct("=I")
_BE_U32 = struct.Struct("!I")
# idiag_inode is the last field of inet_diag_msg: a dump can read it without decoding the rest.
_INET_DIAG_INODE = _INET_DIAG_MSG.size - _U32.size
_NO_INODES: frozenset[int] = frozenset()
# The end of the drop counter within INET_DIAG_SKMEMINFO (an array of u32).
_DROPS_END = (SK_MEMINFO_DROPS + 1) * _U32.size

_sequence = itertools.count(1)


class NetlinkParseError(ValueError):
    """Bytes that are not a well-formed netlink message."""


class NetlinkError(OSError):
    """The kernel answered a netlink request with an error (``errno`` says which)."""


@dataclass(frozen=True, slots=True)
class Header:
    """An nlmsghdr."""

    length: int
    type: int
    flags: int
    seq: int
    pid: int


@dataclass(frozen=True, slots=True)
class Attribute:
    """One rtattr/nlattr: its type (flag bits removed) and its payload without padding."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class LinkMessage:
    """RTM_NEWLINK or RTM_DELLINK: one interface."""

    header: Header
    family: int
    link_type: int
    index: int
    flags: int
    change: int
    name: str | None

    @property
    def up(self) -> bool:
        """The interface is administratively up (IFF_UP)."""
        return bool(self.flags & IFF_UP)

    @property
    def deleted(self) -> bool:
        return self.header.type == RTM_DELLINK


@dataclass(frozen=True, slots=True)
class AddressMessage:
    """RTM_NEWADDR or RTM_DELADDR: one address of one interface.

    ``flags`` is the full IFA_FLAGS value when present (the header's u8 field is truncated).
    ``broadcast`` is IFA_BROADCAST, which only IPv4 addresses have, and only when one was set
    (``ip address add ... brd +``); see ``subnet_broadcast`` for the one the kernel uses.
    """

    header: Header
    family: int
    prefixlen: int
    flags: int
    scope: int
    index: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    local: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    label: str | None
    broadcast: ipaddress.IPv4Address | None = None

    @property
    def local_address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The interface's own address: IFA_LOCAL when present, IFA_ADDRESS otherwise.

        On point-to-point links IFA_ADDRESS is the peer and IFA_LOCAL the local end; everywhere
        else the kernel sends IFA_ADDRESS alone (IPv6) or both with the same value (IPv4).
        """
        return self.local if self.local is not None else self.address

    @property
    def subnet_broadcast(self) -> ipaddress.IPv4Address | None:
        """The IPv4 broadcast address that comes with this address, or None.

        IFA_BROADCAST when the message has it; otherwise the subnet's last address, which the
        kernel makes a broadcast address (a ``broadcast`` route in the local table) whether
        or not one was set, for prefixes shorter than /31 (RFC 3021: a /31 has none). Worked
        out from IFA_ADDRESS, as the kernel does: on a point-to-point link that is the peer.
        """
        if self.broadcast is not None:
            return self.broadcast
        base = self.address if self.address is not None else self.local
        if not isinstance(base, ipaddress.IPv4Address) or self.prefixlen >= 31:
            return None
        network = ipaddress.IPv4Network((base, self.prefixlen), strict=False)
        return network.broadcast_address

    @property
    def deleted(self) -> bool:
        return self.header.type == RTM_DELADDR


@dataclass(frozen=True, slots=True)
class InetDiagMessage:
    """One socket from an inet sock_diag dump (SOCK_DIAG_BY_FAMILY).

    ``ifindex`` is the bound device (SO_BINDTODEVICE or a link-local scope), 0 for none.
    ``v6only`` is None for IPv4 sockets; ``drops`` is None unless INET_DIAG_SKMEMINFO was asked.
    """

    header: Header
    family: int
    state: int
    sport: int
    dport: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    ifindex: int
    cookie: int
    rqueue: int
    wqueue: int
    uid: int
    inode: int
    v6only: bool | None
    drops: int | None


@dataclass(frozen=True, slots=True)
class DoneMessage:
    """NLMSG_DONE: the end of a dump. ``error`` is a positive errno when the dump failed."""

    header: Header
    error: int


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    """NLMSG_ERROR: ``error`` is a positive errno, or 0 for an acknowledgement."""

    header: Header
    error: int


@dataclass(frozen=True, slots=True)
class UnknownMessage:
    """Any message this module does not decode, kept whole."""

    header: Header
    payload: bytes


Message = (
    LinkMessage | AddressMessage | InetDiagMessage | DoneMessage | ErrorMessage | UnknownMessage
)


def align(length: int) -> int:
    """NLMSG_ALIGN / RTA_ALIGN: round up to 4 bytes."""
    return (length + 3) & ~3


def parse_header(data: bytes, offset: int = 0) -> Header:
    """Decode the nlmsghdr at ``offset``."""
    if len(data) - offset < _NLMSGHDR.size:
        raise NetlinkParseError(f"truncated nlmsghdr at offset {offset}")
    return Header(*_NLMSGHDR.unpack_from(data, offset))


def parse_attributes(data: bytes) -> tuple[Attribute, ...]:
    """Decode a list of rtattr/nlattr; trailing bytes shorter than a header are ignored."""
    return tuple(
        Attribute(kind, bytes(data[start:end])) for kind, start, end in _attribute_spans(data, 0)
    )


def _attribute_spans(data: bytes, offset: int) -> Iterator[tuple[int, int, int]]:
    """Each attribute from ``offset`` on as (type, value start, value end), without copying."""
    size = len(data)
    while size - offset >= _RTATTR.size:
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > size:
            raise NetlinkParseError(f"bad attribute length {length} at offset {offset}")
        yield kind & NLA_TYPE_MASK, offset + _RTATTR.size, offset + length
        offset += align(length)


def parse_messages(data: bytes, protocol: int = NETLINK_ROUTE) -> Iterator[Message]:
    """Decode every netlink message in one datagram, in order.

    Args:
        data: the bytes of one recv() (or crafted bytes).
        protocol: NETLINK_ROUTE or NETLINK_SOCK_DIAG; it decides what type 20 means.

    Raises:
        NetlinkParseError: a length field points outside the data or a payload is too short.
    """
    for fields, offset in _frames(data):
        yield _decode(Header(*fields), _payload(data, offset, fields[0]), protocol)


def _frames(data: bytes) -> Iterator[tuple[tuple[int, int, int, int, int], int]]:
    """Each message's nlmsghdr fields (not yet a Header) and offset, its length checked."""
    offset = 0
    size = len(data)
    while size - offset >= _NLMSGHDR.size:
        fields = _NLMSGHDR.unpack_from(data, offset)
        length = fields[0]
        if length < _NLMSGHDR.size or offset + length > size:
            raise NetlinkParseError(f"bad nlmsg_len {length} at offset {offset}")
        yield fields, offset
        offset += align(length)


def _payload(data: bytes, offset: int, length: int) -> bytes:
    return bytes(data[offset + _NLMSGHDR.size : offset + length])


def _diag_inode(data: bytes, offset: int, length: int) -> int | None:
    """The socket inode of the inet_diag_msg at ``offset``, read in place; None if not one."""
    start = offset + _NLMSGHDR.size
    if length - _NLMSGHDR.size < _INET_DIAG_MSG.size:
        return None  # too short: decoding it reports the error
    if data[start] not in (socket.AF_INET, socket.AF_INET6):
        return None
    inode: int = _U32.unpack_from(data, start + _INET_DIAG_INODE)[0]
    return inode


def _decode(header: Header, payload: bytes, protocol: int) -> Message:
    if header.type == NLMSG_DONE:
        # A dump that failed part-way reports the error in NLMSG_DONE's int payload.
        code = _NLMSGERR.unpack_from(payload)[0] if len(payload) >= _NLMSGERR.size else 0
        return DoneMessage(header, -code if code < 0 else 0)
    if header.type == NLMSG_ERROR:
        _need(payload, _NLMSGERR.size, "nlmsgerr")
        return ErrorMessage(header, -_NLMSGERR.unpack_from(payload)[0])
    if protocol == NETLINK_ROUTE:
        if header.type in (RTM_NEWLINK, RTM_DELLINK):
            return parse_link(header, payload)
        if header.type in (RTM_NEWADDR, RTM_DELADDR):
            return parse_address(header, payload)
    if protocol == NETLINK_SOCK_DIAG and header.type == SOCK_DIAG_BY_FAMILY:
        family = payload[0] if payload else 0
        if family in (socket.AF_INET, socket.AF_INET6):
            return parse_inet_diag(header, payload)
    return UnknownMessage(header, payload)


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise NetlinkParseError(f"truncated {what}: {len(payload)} bytes, need {size}")


def _text(value: bytes) -> str:
    # Interface names are bytes to the kernel; surrogateescape keeps odd ones round-trippable,
    # as os.fsdecode does.
    return value.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# Addresses repeat across a dump (every unconnected socket's peer is the wildcard, many sockets
# share 127.0.0.1) and ipaddress objects are immutable, so recent ones are shared.
@functools.lru_cache(maxsize=4096)
def _ip(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(_BE_U32.unpack_from(raw)[0])
    return ipaddress.IPv6Address(raw[:16])


def _ip_attribute(
    family: int, value: bytes
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    size = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
    if size == 0 or len(value) != size:
        return None
    return _ip(family, value)


def parse_link(header: Header, payload: bytes) -> LinkMessage:
    """Decode an ifinfomsg and its IFLA_IFNAME."""
    _need(payload, _IFINFOMSG.size, "ifinfomsg")
    family, link_type, index, flags, change = _IFINFOMSG.unpack_from(payload)
    name = None
    for attribute in parse_attributes(payload[_IFINFOMSG.size :]):
        if attribute.type == IFLA_IFNAME:
            name = _text(attribute.value)
    return LinkMessage(header, family, link_type, index, flags, change, name)


def parse_address(header: Header, payload: bytes) -> AddressMessage:
    """Decode an ifaddrmsg with IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_BROADCAST, IFA_FLAGS."""
    _need(payload, _IFADDRMSG.size, "ifaddrmsg")
    family, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(payload)
    address = local = None
    label = None
    broadcast = None
    for attribute in parse_attributes(payload[_IFADDRMSG.size :]):
        if attribute.type == IFA_ADDRESS:
            address = _ip_attribute(family, attribute.value)
        elif attribute.type == IFA_LOCAL:
            local = _ip_attribute(family, attribute.value)
        elif attribute.type == IFA_LABEL:
            label = _text(attribute.value)
        elif attribute.type == IFA_BROADCAST and family == socket.AF_INET:
            value = _ip_attribute(family, attribute.value)
            # The kernel sends none for 0.0.0.0 (no broadcast): never take that one as such.
            if isinstance(value, ipaddress.IPv4Address) and int(value):
                broadcast = value
        elif attribute.type == IFA_FLAGS and len(attribute.value) >= _U32.size:
            flags = _U32.unpack_from(attribute.value)[0]
    return AddressMessage(
        header, family, prefixlen, flags, scope, index, address, local, label, broadcast
    )


def parse_inet_diag(header: Header, payload: bytes) -> InetDiagMessage:
    """Decode an inet_diag_msg with INET_DIAG_SKV6ONLY and INET_DIAG_SKMEMINFO."""
    _need(payload, _INET_DIAG_MSG.size, "inet_diag_msg")
    (
        family,
        state,
        _timer,
        _retrans,
        sport,
        dport,
        src,
        dst,
        ifindex,
        cookie_low,
        cookie_high,
        _expires,
        rqueue,
        wqueue,
        uid,
        inode,
    ) = _INET_DIAG_MSG.unpack_from(payload)
    v6only = None
    drops = None
    for kind, start, end in _attribute_spans(payload, _INET_DIAG_MSG.size):
        if kind == INET_DIAG_SKV6ONLY and end > start:
            v6only = payload[start] != 0
        elif kind == INET_DIAG_SKMEMINFO and end - start >= _DROPS_END:
            drops = _U32.unpack_from(payload, start + _DROPS_END - _U32.size)[0]
    return InetDiagMessage(
        header=header,
        family=family,
        state=state,
        sport=int.from_bytes(sport, "big"),
        dport=int.from_bytes(dport, "big"),
        src=_ip(family, src),
        dst=_ip(family, dst),
        ifindex=ifindex,
        cookie=cookie_low | cookie_high << 32,
        rqueue=rqueue,
        wqueue=wqueue,
        uid=uid,
        inode=inode,
        v6only=v6only if family == socket.AF_INET6 else None,
        drops=drops,
    )


def pack_message(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    """Build one netlink message (header, payload and padding)."""
    length = _NLMSGHDR.size + len(payload)
    padding = bytes(align(length) - length)
    return _NLMSGHDR.pack(length, msg_type, flags, seq, 0) + payload + padding


def link_dump_request() -> bytes:
    """The payload of an RTM_GETLINK dump: an empty ifinfomsg."""
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)


def address_dump_request(family: int = socket.AF_UNSPEC) -> bytes:
    """The payload of an RTM_GETADDR dump: an ifaddrmsg naming the family (AF_UNSPEC = all)."""
    return _IFADDRMSG.pack(family, 0, 0, 0, 0)


def udp_diag_request(family: int, *, memory: bool = True) -> bytes:
    """The payload of a UDP sock_diag dump (inet_diag_req_v2) for one family, every state.

    With ``memory``, each socket carries INET_DIAG_SKMEMINFO, which holds the drop counter.
    """
    extensions = 1 << (INET_DIAG_SKMEMINFO - 1) if memory else 0
    return _INET_DIAG_REQ_V2.pack(
        family, socket.IPPROTO_UDP, extensions, 0, DIAG_ALL_STATES, bytes(48)
    )


def open_socket(protocol: int, groups: int = 0) -> socket.socket:
    """Open and bind a netlink socket (port id chosen by the kernel), joined to ``groups``.

    Raises:
        OSError: the protocol is not available, or bind() failed.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    try:
        sock.bind((0, groups))
    except OSError:
        sock.close()
        raise
    return sock


def dump(
    protocol: int,
    msg_type: int,
    payload: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_DUMP_BYTES,
    skip_inodes: Collection[int] = _NO_INODES,
) -> list[Message]:
    """Send one dump request and return every message up to NLMSG_DONE.

    A dump the kernel marks as interrupted (the table changed under it) is retried, up to
    DUMP_ATTEMPTS times. sock_diag messages of the sockets in ``skip_inodes`` are left out
    (see ``receive_dump``).

    Raises:
        NetlinkError: the kernel answered with an error, or the dump kept being interrupted.
        TimeoutError: no NLMSG_DONE within ``timeout`` seconds.
        OSError: the socket could not be opened or used.
    """
    for _ in range(DUMP_ATTEMPTS):
        seq = next(_sequence) & 0xFFFFFFFF
        request = pack_message(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, payload)
        with open_socket(protocol) as sock:
            sock.sendto(request, (0, 0))
            messages, interrupted = receive_dump(
                sock, protocol, seq, timeout=timeout, max_bytes=max_bytes, skip_inodes=skip_inodes
            )
        if not interrupted:
            return messages
    raise NetlinkError(errno.EAGAIN, "netlink dump was interrupted on every attempt")


def receive_dump(
    sock: socket.socket,
    protocol: int,
    seq: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    max_bytes: int = MAX_DUMP_BYTES,
    skip_inodes: Collection[int] = _NO_INODES,
) -> tuple[list[Message], bool]:
    """Receive the answer to dump request ``seq`` on ``sock``, up to its NLMSG_DONE.

    Returns the messages and whether the kernel flagged the dump as interrupted
    (NLM_F_DUMP_INTR). Messages of other requests are skipped. So are the inet sock_diag
    messages of sockets whose inode is in ``skip_inodes``: the inode is read in place and
    nothing else of them is decoded, which matters when a process surveys 10,000 sockets of
    its own. Their header still counts (an interrupted dump is still reported).

    Raises:
        NetlinkError: an NLMSG_ERROR or a failed NLMSG_DONE, or more than ``max_bytes``.
        TimeoutError: no NLMSG_DONE within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    messages: list[Message] = []
    interrupted = False
    received = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "netlink dump did not finish in time")
        sock.settimeout(remaining)
        data, _, msg_flags, _ = sock.recvmsg(RECV_BUFFER)
        if msg_flags & socket.MSG_TRUNC:
            raise NetlinkError(errno.EMSGSIZE, "netlink message larger than the receive buffer")
        received += len(data)
        if received > max_bytes:
            raise NetlinkError(errno.EMSGSIZE, f"netlink dump exceeded {max_bytes} bytes")
        skipping = bool(skip_inodes) and protocol == NETLINK_SOCK_DIAG
        for fields, offset in _frames(data):
            length, msg_type, flags, message_seq, _ = fields
            if message_seq != seq:
                continue  # a late answer to an earlier request on a reused port id
            if flags & NLM_F_DUMP_INTR:
                interrupted = True
            if (
                skipping
                and msg_type == SOCK_DIAG_BY_FAMILY
                and _diag_inode(data, offset, length) in skip_inodes
            ):
                continue
            message = _decode(Header(*fields), _payload(data, offset, length), protocol)
            if isinstance(message, ErrorMessage):
                if message.error:
                    raise NetlinkError(message.error, os.strerror(message.error))
                continue  # an acknowledgement
            if isinstance(message, DoneMessage):
                if message.error:
                    raise NetlinkError(message.error, os.strerror(message.error))
                return messages, interrupted
            messages.append(message)
