"""Netlink parsers on crafted bytes, and real dumps against this kernel."""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
import struct

import pytest

from udpbindd import netlink

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6
HEADER = netlink.Header(0, 0, 0, 0, 0)


def nlmsg(msg_type: int, payload: bytes, *, flags: int = 0, seq: int = 1, pid: int = 0) -> bytes:
    length = 16 + len(payload)
    padding = b"\0" * (-length % 4)
    return struct.pack("=IHHII", length, msg_type, flags, seq, pid) + payload + padding


def rta(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def ifaddrmsg(family: int, prefixlen: int, flags: int, scope: int, index: int) -> bytes:
    return struct.pack("=BBBBI", family, prefixlen, flags, scope, index)


def ifinfomsg(index: int, flags: int, *, link_type: int = 1, change: int = 0) -> bytes:
    return struct.pack("=BxHiII", socket.AF_UNSPEC, link_type, index, flags, change)


def diag_msg(
    family: int,
    sport: int,
    src: str,
    *,
    ifindex: int = 0,
    uid: int = 0,
    inode: int = 0,
    cookie: int = 0,
    state: int = 7,
    rqueue: int = 0,
) -> bytes:
    packed = ipaddress.ip_address(src).packed.ljust(16, b"\0")
    return (
        struct.pack("=BBBB", family, state, 0, 0)
        + struct.pack(">HH", sport, 0)
        + packed
        + b"\0" * 16
        + struct.pack("=III", ifindex, cookie & 0xFFFFFFFF, cookie >> 32)
        + struct.pack("=IIIII", 0, rqueue, 0, uid, inode)
    )


def meminfo(drops: int) -> bytes:
    words = [0] * 9
    words[netlink.SK_MEMINFO_DROPS] = drops
    return struct.pack("=9I", *words)


def test_parse_header() -> None:
    data = struct.pack("=IHHII", 20, 16, 0x302, 7, 1234) + b"\0" * 4
    assert netlink.parse_header(data) == netlink.Header(20, 16, 0x302, 7, 1234)


def test_parse_header_truncated() -> None:
    with pytest.raises(netlink.NetlinkParseError):
        netlink.parse_header(b"\0" * 15)


def test_parse_attributes_padding_and_flag_bits() -> None:
    nested = 0x8000 | 5
    data = rta(3, b"abcde") + rta(nested, b"") + rta(8, struct.pack("=I", 9))
    assert netlink.parse_attributes(data) == (
        netlink.Attribute(3, b"abcde"),
        netlink.Attribute(5, b""),
        netlink.Attribute(8, struct.pack("=I", 9)),
    )


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("=HH", 3, 1),  # shorter than its own header
        struct.pack("=HH", 12, 1) + b"abcd",  # longer than the data
    ],
)
def test_parse_attributes_bad_length(data: bytes) -> None:
    with pytest.raises(netlink.NetlinkParseError):
        netlink.parse_attributes(data)


def test_address_message_ipv4_point_to_point() -> None:
    payload = (
        ifaddrmsg(AF_INET, 32, netlink.IFA_F_PERMANENT, netlink.RT_SCOPE_UNIVERSE, 4)
        + rta(netlink.IFA_ADDRESS, bytes([10, 0, 0, 2]))
        + rta(netlink.IFA_LOCAL, bytes([10, 0, 0, 1]))
        + rta(netlink.IFA_LABEL, b"ppp0\0")
        + rta(netlink.IFA_FLAGS, struct.pack("=I", 0x280))
    )
    [message] = netlink.parse_messages(nlmsg(netlink.RTM_NEWADDR, payload))
    assert isinstance(message, netlink.AddressMessage)
    assert (message.family, message.prefixlen, message.scope, message.index) == (AF_INET, 32, 0, 4)
    assert message.flags == 0x280  # IFA_FLAGS wins over the truncated u8 field
    assert message.address == ipaddress.IPv4Address("10.0.0.2")
    assert message.local == ipaddress.IPv4Address("10.0.0.1")
    assert message.local_address == ipaddress.IPv4Address("10.0.0.1")
    assert message.label == "ppp0"
    assert not message.deleted


def test_address_message_ipv6_deleted() -> None:
    payload = ifaddrmsg(AF_INET6, 64, netlink.IFA_F_NODAD, netlink.RT_SCOPE_LINK, 2) + rta(
        netlink.IFA_ADDRESS, ipaddress.IPv6Address("fe80::1").packed
    )
    [message] = netlink.parse_messages(nlmsg(netlink.RTM_DELADDR, payload))
    assert isinstance(message, netlink.AddressMessage)
    assert message.deleted
    assert message.local is None
    assert message.local_address == ipaddress.IPv6Address("fe80::1")
    assert message.flags == netlink.IFA_F_NODAD
    assert message.scope == netlink.RT_SCOPE_LINK
    assert message.label is None


def test_address_message_ipv4_broadcast() -> None:
    payload = (
        ifaddrmsg(AF_INET, 24, netlink.IFA_F_PERMANENT, netlink.RT_SCOPE_UNIVERSE, 3)
        + rta(netlink.IFA_ADDRESS, bytes([10, 9, 0, 1]))
        + rta(netlink.IFA_LOCAL, bytes([10, 9, 0, 1]))
        # Set by the operator to other than the subnet's last address: taken as given.
        + rta(netlink.IFA_BROADCAST, bytes([10, 9, 0, 127]))
        + rta(netlink.IFA_LABEL, b"eth0\0")
    )
    [message] = netlink.parse_messages(nlmsg(netlink.RTM_NEWADDR, payload))
    assert isinstance(message, netlink.AddressMessage)
    assert message.broadcast == ipaddress.IPv4Address("10.9.0.127")
    assert message.subnet_broadcast == ipaddress.IPv4Address("10.9.0.127")
    assert message.local_address == ipaddress.IPv4Address("10.9.0.1")
    assert message.label == "eth0"


def _address(
    family: int, prefixlen: int, address: str | None, *extra: bytes
) -> netlink.AddressMessage:
    attributes = (
        b"" if address is None else rta(netlink.IFA_ADDRESS, ipaddress.ip_address(address).packed)
    )
    payload = ifaddrmsg(family, prefixlen, 0, 0, 2) + attributes + b"".join(extra)
    [message] = netlink.parse_messages(nlmsg(netlink.RTM_NEWADDR, payload))
    assert isinstance(message, netlink.AddressMessage)
    return message


@pytest.mark.parametrize(
    ("prefixlen", "address", "expected"),
    [
        (24, "10.9.0.1", "10.9.0.255"),  # no IFA_BROADCAST: the kernel's own, the last address
        (8, "127.0.0.1", "127.255.255.255"),  # loopback has one too (a local broadcast route)
        (30, "192.0.2.5", "192.0.2.7"),
        (0, "192.0.2.5", "255.255.255.255"),
        (31, "192.0.2.4", None),  # RFC 3021: a point-to-point /31 has no broadcast
        (32, "192.0.2.4", None),
        (64, "2001:db8::1", None),  # IPv6 has no broadcast
    ],
)
def test_subnet_broadcast_without_the_attribute(
    prefixlen: int, address: str, expected: str | None
) -> None:
    family = AF_INET6 if ":" in address else AF_INET
    message = _address(family, prefixlen, address)
    assert message.broadcast is None
    found = message.subnet_broadcast
    assert found == (None if expected is None else ipaddress.IPv4Address(expected))


def test_subnet_broadcast_of_a_point_to_point_peer_prefix() -> None:
    # ip address add 10.9.0.1 peer 10.8.0.2/24: the prefix, and so the broadcast, is the peer's.
    local = rta(netlink.IFA_LOCAL, bytes([10, 9, 0, 1]))
    message = _address(AF_INET, 24, "10.8.0.2", local)
    assert message.local_address == ipaddress.IPv4Address("10.9.0.1")
    assert message.subnet_broadcast == ipaddress.IPv4Address("10.8.0.255")


@pytest.mark.parametrize(
    ("family", "value"),
    [
        (AF_INET, bytes(4)),  # 0.0.0.0 is no broadcast (the kernel would not send it)
        (AF_INET, bytes([10, 9, 0])),  # the wrong size
        (AF_INET6, ipaddress.IPv6Address("2001:db8::ff").packed),  # not an IPv6 attribute
    ],
)
def test_odd_broadcast_attributes_are_ignored(family: int, value: bytes) -> None:
    address = "10.9.0.1" if family == AF_INET else "2001:db8::1"
    message = _address(family, 24, address, rta(netlink.IFA_BROADCAST, value))
    assert message.broadcast is None
    assert message.subnet_broadcast == (
        ipaddress.IPv4Address("10.9.0.255") if family == AF_INET else None
    )


def test_link_messages() -> None:
    up = ifinfomsg(1, netlink.IFF_UP | netlink.IFF_LOOPBACK, link_type=772) + rta(
        netlink.IFLA_IFNAME, b"lo\0"
    )
    down = ifinfomsg(7, 0) + rta(netlink.IFLA_IFNAME, b"veth\xff0\0")
    data = nlmsg(netlink.RTM_NEWLINK, up) + nlmsg(netlink.RTM_DELLINK, down)
    first, second = netlink.parse_messages(data)
    assert isinstance(first, netlink.LinkMessage)
    assert isinstance(second, netlink.LinkMessage)
    assert (first.index, first.name, first.up, first.link_type) == (1, "lo", True, 772)
    assert not first.deleted
    assert (second.index, second.up, second.deleted) == (7, False, True)
    assert os.fsencode(second.name or "") == b"veth\xff0"


def test_inet_diag_ipv4_with_drops() -> None:
    payload = diag_msg(
        AF_INET, 1060, "127.0.0.1", ifindex=1, uid=65534, inode=4242, cookie=(5 << 32) | 6
    ) + rta(netlink.INET_DIAG_SKMEMINFO, meminfo(2002))
    [message] = netlink.parse_messages(
        nlmsg(netlink.SOCK_DIAG_BY_FAMILY, payload), netlink.NETLINK_SOCK_DIAG
    )
    assert isinstance(message, netlink.InetDiagMessage)
    assert message.family == AF_INET
    assert message.sport == 1060
    assert message.src == ipaddress.IPv4Address("127.0.0.1")
    assert message.dst == ipaddress.IPv4Address("0.0.0.0")
    assert (message.ifindex, message.uid, message.inode) == (1, 65534, 4242)
    assert message.cookie == (5 << 32) | 6
    assert message.drops == 2002
    assert message.v6only is None


@pytest.mark.parametrize(("flag", "expected"), [(b"\x01", True), (b"\x00", False), (None, None)])
def test_inet_diag_ipv6_v6only(flag: bytes | None, expected: bool | None) -> None:
    payload = diag_msg(AF_INET6, 53, "::", inode=9)
    if flag is not None:
        payload += rta(netlink.INET_DIAG_SKV6ONLY, flag)
    [message] = netlink.parse_messages(
        nlmsg(netlink.SOCK_DIAG_BY_FAMILY, payload), netlink.NETLINK_SOCK_DIAG
    )
    assert isinstance(message, netlink.InetDiagMessage)
    assert message.src == ipaddress.IPv6Address("::")
    assert message.v6only is expected
    assert message.drops is None


def test_type_20_depends_on_protocol() -> None:
    # An inet_diag_msg whose source address doubles as one rtattr spanning the rest, so the
    # same bytes are well formed both as SOCK_DIAG_BY_FAMILY and as RTM_NEWADDR.
    source = ipaddress.IPv6Address(struct.pack("=HH", 64, 99) + bytes(12))
    data = nlmsg(20, diag_msg(AF_INET6, 53, str(source)))
    [route] = netlink.parse_messages(data, netlink.NETLINK_ROUTE)
    [diag] = netlink.parse_messages(data, netlink.NETLINK_SOCK_DIAG)
    assert isinstance(route, netlink.AddressMessage)
    assert route.family == AF_INET6
    assert route.local_address is None
    assert isinstance(diag, netlink.InetDiagMessage)
    assert (diag.src, diag.sport) == (source, 53)


def test_control_and_unknown_messages() -> None:
    data = (
        nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + b"\0" * 16, seq=3)
        + nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", 0) + b"\0" * 16)
        + nlmsg(netlink.NLMSG_DONE, struct.pack("=i", -errno.ENOBUFS))
        + nlmsg(netlink.NLMSG_DONE, struct.pack("=i", 0), flags=netlink.NLM_F_MULTI)
        + nlmsg(netlink.NLMSG_NOOP, b"")
        + nlmsg(99, b"xyz")
        + nlmsg(netlink.SOCK_DIAG_BY_FAMILY, b"\x01" + b"\0" * 71)  # AF_UNIX: not inet
    )
    messages = list(netlink.parse_messages(data, netlink.NETLINK_SOCK_DIAG))
    assert [type(m).__name__ for m in messages] == [
        "ErrorMessage",
        "ErrorMessage",
        "DoneMessage",
        "DoneMessage",
        "UnknownMessage",
        "UnknownMessage",
        "UnknownMessage",
    ]
    assert messages[0] == netlink.ErrorMessage(messages[0].header, errno.EPERM)
    assert messages[0].header.seq == 3
    assert messages[1] == netlink.ErrorMessage(messages[1].header, 0)
    assert messages[2] == netlink.DoneMessage(messages[2].header, errno.ENOBUFS)
    assert messages[3] == netlink.DoneMessage(messages[3].header, 0)
    assert messages[5] == netlink.UnknownMessage(messages[5].header, b"xyz")


@pytest.mark.parametrize(
    ("data", "protocol"),
    [
        (struct.pack("=IHHII", 40, 16, 0, 0, 0) + b"\0" * 8, netlink.NETLINK_ROUTE),  # past end
        (struct.pack("=IHHII", 8, 16, 0, 0, 0), netlink.NETLINK_ROUTE),  # below header size
        (nlmsg(netlink.RTM_NEWLINK, b"\0" * 8), netlink.NETLINK_ROUTE),  # short ifinfomsg
        (nlmsg(netlink.RTM_NEWADDR, b"\0" * 4), netlink.NETLINK_ROUTE),  # short ifaddrmsg
        (nlmsg(20, b"\x02" + b"\0" * 40), netlink.NETLINK_SOCK_DIAG),  # short inet_diag_msg
        (nlmsg(netlink.NLMSG_ERROR, b"\0\0"), netlink.NETLINK_ROUTE),  # short nlmsgerr
    ],
)
def test_malformed_messages(data: bytes, protocol: int) -> None:
    with pytest.raises(netlink.NetlinkParseError):
        list(netlink.parse_messages(data, protocol))


def test_trailing_bytes_shorter_than_a_header_are_ignored() -> None:
    data = nlmsg(netlink.NLMSG_NOOP, b"") + b"\0" * 8
    assert len(list(netlink.parse_messages(data))) == 1


def test_pack_message_pads_to_four_bytes() -> None:
    data = netlink.pack_message(netlink.RTM_GETADDR, netlink.NLM_F_REQUEST, 9, b"\x0a")
    assert len(data) == 20
    assert netlink.parse_header(data) == netlink.Header(17, netlink.RTM_GETADDR, 1, 9, 0)


def test_udp_diag_request_layout() -> None:
    data = netlink.udp_diag_request(AF_INET6)
    assert len(data) == 56  # sizeof(struct inet_diag_req_v2)
    family, protocol, ext, _pad, states = struct.unpack_from("=BBBBI", data)
    assert (family, protocol) == (AF_INET6, socket.IPPROTO_UDP)
    assert ext == 1 << (netlink.INET_DIAG_SKMEMINFO - 1)
    assert states == 0xFFFFFFFF
    assert data[8:] == b"\0" * 48
    assert netlink.udp_diag_request(AF_INET, memory=False)[2] == 0


def test_dump_links_of_this_host() -> None:
    messages = netlink.dump(netlink.NETLINK_ROUTE, netlink.RTM_GETLINK, netlink.link_dump_request())
    links = {m.name: m for m in messages if isinstance(m, netlink.LinkMessage)}
    assert links["lo"].index == socket.if_nametoindex("lo")
    assert links["lo"].up


def test_dump_addresses_of_this_host() -> None:
    messages = netlink.dump(
        netlink.NETLINK_ROUTE, netlink.RTM_GETADDR, netlink.address_dump_request()
    )
    lo = socket.if_nametoindex("lo")
    addresses = {m.local_address for m in messages if isinstance(m, netlink.AddressMessage)}
    mine = {
        m.local_address for m in messages if isinstance(m, netlink.AddressMessage) and m.index == lo
    }
    assert ipaddress.IPv4Address("127.0.0.1") in mine
    assert ipaddress.IPv6Address("::1") in mine
    assert mine <= addresses


def test_dump_udp_sockets_finds_a_bound_socket() -> None:
    with socket.socket(AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
        inode = os.fstat(sock.fileno()).st_ino
        messages = netlink.dump(
            netlink.NETLINK_SOCK_DIAG,
            netlink.SOCK_DIAG_BY_FAMILY,
            netlink.udp_diag_request(AF_INET6),
        )
    [mine] = [m for m in messages if isinstance(m, netlink.InetDiagMessage) and m.inode == inode]
    assert (mine.family, mine.src, mine.sport) == (AF_INET6, ipaddress.IPv6Address("::1"), port)
    assert mine.v6only is True
    assert mine.drops == 0
    assert mine.uid == os.getuid()


def test_dump_skips_the_given_inodes_on_real_sockets() -> None:
    with (
        socket.socket(AF_INET, socket.SOCK_DGRAM) as kept,
        socket.socket(AF_INET, socket.SOCK_DGRAM) as skipped,
    ):
        kept.bind(("127.0.0.1", 0))
        skipped.bind(("127.0.0.1", 0))
        inodes = {os.fstat(s.fileno()).st_ino for s in (kept, skipped)}
        skip = {os.fstat(skipped.fileno()).st_ino}
        request = (netlink.NETLINK_SOCK_DIAG, netlink.SOCK_DIAG_BY_FAMILY)
        everything = netlink.dump(*request, netlink.udp_diag_request(AF_INET))
        rest = netlink.dump(*request, netlink.udp_diag_request(AF_INET), skip_inodes=skip)

    def ours(messages: list[netlink.Message]) -> list[netlink.InetDiagMessage]:
        # Headers carry each dump's own sequence number: compare without them.
        return [
            dataclasses.replace(m, header=HEADER)
            for m in messages
            if isinstance(m, netlink.InetDiagMessage) and m.inode in inodes
        ]

    assert len(ours(everything)) == 2
    assert ours(rest) == [m for m in ours(everything) if m.inode not in skip]


def test_dump_error_is_raised_with_errno() -> None:
    # sock_diag refuses families at or above AF_MAX with EINVAL.
    with pytest.raises(netlink.NetlinkError) as caught:
        netlink.dump(
            netlink.NETLINK_SOCK_DIAG, netlink.SOCK_DIAG_BY_FAMILY, netlink.udp_diag_request(255)
        )
    assert caught.value.errno == errno.EINVAL
    assert isinstance(caught.value, OSError)


def test_open_socket_joins_groups() -> None:
    groups = netlink.RTMGRP_LINK | netlink.RTMGRP_IPV4_IFADDR | netlink.RTMGRP_IPV6_IFADDR
    with netlink.open_socket(netlink.NETLINK_ROUTE, groups) as sock:
        port_id, joined = sock.getsockname()
    assert port_id != 0
    assert joined == groups


def _feed(*datagrams: bytes) -> tuple[socket.socket, socket.socket]:
    # A datagram socketpair stands in for the kernel end: receive_dump only needs recvmsg().
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for datagram in datagrams:
        writer.send(datagram)
    return reader, writer


def _link_bytes(index: int, *, seq: int, flags: int = netlink.NLM_F_MULTI) -> bytes:
    payload = ifinfomsg(index, netlink.IFF_UP) + rta(netlink.IFLA_IFNAME, b"eth0\0")
    return nlmsg(netlink.RTM_NEWLINK, payload, flags=flags, seq=seq)


def test_receive_dump_skips_other_requests_and_acks() -> None:
    reader, writer = _feed(
        _link_bytes(1, seq=6),  # a late answer to an earlier request
        _link_bytes(2, seq=7) + nlmsg(netlink.NLMSG_ERROR, bytes(20), seq=7),
        _link_bytes(3, seq=7, flags=netlink.NLM_F_MULTI | netlink.NLM_F_DUMP_INTR),
        nlmsg(netlink.NLMSG_DONE, struct.pack("=i", 0), seq=7),
    )
    with reader, writer:
        messages, interrupted = netlink.receive_dump(reader, netlink.NETLINK_ROUTE, 7)
    assert [m.index for m in messages if isinstance(m, netlink.LinkMessage)] == [2, 3]
    assert len(messages) == 2
    assert interrupted


@pytest.mark.parametrize(
    ("datagram", "code"),
    [
        (nlmsg(netlink.NLMSG_ERROR, struct.pack("=i", -errno.EPERM) + bytes(16), seq=7), "EPERM"),
        (nlmsg(netlink.NLMSG_DONE, struct.pack("=i", -errno.ENOBUFS), seq=7), "ENOBUFS"),
    ],
)
def test_receive_dump_raises_the_kernel_errno(datagram: bytes, code: str) -> None:
    reader, writer = _feed(datagram)
    with reader, writer, pytest.raises(netlink.NetlinkError) as caught:
        netlink.receive_dump(reader, netlink.NETLINK_ROUTE, 7)
    assert caught.value.errno == getattr(errno, code)


def _diag_bytes(inode: int, *, seq: int = 7, flags: int = netlink.NLM_F_MULTI) -> bytes:
    payload = diag_msg(AF_INET, 1060, "127.0.0.1", inode=inode)
    payload += rta(netlink.INET_DIAG_SKMEMINFO, meminfo(0))
    return nlmsg(netlink.SOCK_DIAG_BY_FAMILY, payload, flags=flags, seq=seq)


def test_receive_dump_skips_inodes_before_decoding() -> None:
    interrupted_flags = netlink.NLM_F_MULTI | netlink.NLM_F_DUMP_INTR
    reader, writer = _feed(
        _diag_bytes(1) + _diag_bytes(2) + _diag_bytes(3, flags=interrupted_flags),
        # Not an inet family, though inode 2 is where an inet_diag_msg has it: kept.
        nlmsg(netlink.SOCK_DIAG_BY_FAMILY, b"\x01" + bytes(67) + struct.pack("=I", 2), seq=7),
        nlmsg(netlink.NLMSG_DONE, struct.pack("=i", 0), seq=7),
    )
    with reader, writer:
        messages, interrupted = netlink.receive_dump(
            reader, netlink.NETLINK_SOCK_DIAG, 7, skip_inodes={2, 3}
        )
    diag = [m for m in messages if isinstance(m, netlink.InetDiagMessage)]
    assert [m.inode for m in diag] == [1]
    assert diag[0].src == ipaddress.IPv4Address("127.0.0.1")
    assert [type(m).__name__ for m in messages] == ["InetDiagMessage", "UnknownMessage"]
    assert interrupted  # flagged on a message that was skipped


def test_receive_dump_still_rejects_a_short_inet_diag_msg() -> None:
    reader, writer = _feed(nlmsg(netlink.SOCK_DIAG_BY_FAMILY, b"\x02" + bytes(40), seq=7))
    with reader, writer, pytest.raises(netlink.NetlinkParseError):
        netlink.receive_dump(reader, netlink.NETLINK_SOCK_DIAG, 7, skip_inodes={0})


def test_receive_dump_skips_nothing_of_other_protocols() -> None:
    # Type 20 is RTM_NEWADDR on NETLINK_ROUTE: the inode offset means nothing there.
    local = rta(netlink.IFA_LOCAL, bytes([10, 0, 0, 1]))
    payload = ifaddrmsg(AF_INET, 8, 0, 0, 1) + local + rta(netlink.IFA_LABEL, b"x" * 70 + b"\0")
    reader, writer = _feed(
        nlmsg(netlink.RTM_NEWADDR, payload, seq=7) + nlmsg(netlink.NLMSG_DONE, bytes(4), seq=7)
    )
    with reader, writer:
        messages, _ = netlink.receive_dump(
            reader, netlink.NETLINK_ROUTE, 7, skip_inodes=set(range(1 << 16))
        )
    assert [type(m).__name__ for m in messages] == ["AddressMessage"]


def test_receive_dump_is_bounded() -> None:
    reader, writer = _feed(_link_bytes(1, seq=7))
    with reader, writer:
        with pytest.raises(TimeoutError):
            netlink.receive_dump(reader, netlink.NETLINK_ROUTE, 7, timeout=0.05)
        writer.send(_link_bytes(1, seq=7))
        with pytest.raises(netlink.NetlinkError) as caught:
            netlink.receive_dump(reader, netlink.NETLINK_ROUTE, 7, max_bytes=10)
    assert caught.value.errno == errno.EMSGSIZE
