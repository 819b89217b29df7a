"""What this host already has: bound UDP sockets with their owners, interfaces and UDP sysctls.

Everything is read from the caller's network namespace. The parsers are pure functions; the
readers around them are thin and tolerate processes and interfaces vanishing while they look.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from udpbindd import netlink
from udpbindd.names import IPV6_ANY, IPAddress, SocketName

PROC_UDP = ("/proc/net/udp", "/proc/net/udp6")
PROC_ROOT = "/proc"
UDP_HASH_ENTRIES = "/proc/sys/net/ipv4/udp_hash_entries"
IP_LOCAL_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"
DEFAULT_UDP_HASH_ENTRIES = 16384
DEFAULT_LOCAL_PORT_RANGE = (32768, 60999)

# Columns of /proc/net/udp{,6} after splitting on whitespace (see udp4_format_sock()).
_COL_SLOT, _COL_LOCAL, _COL_REMOTE, _COL_STATE, _COL_QUEUES = 0, 1, 2, 3, 4
_COL_UID, _COL_INODE, _COL_DROPS = 7, 9, 12
_PROC_COLUMNS = 13

_SOCKET_LINK_PREFIX = "socket:["
_NO_INODES: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Owner:
    """A process holding a socket open."""

    pid: int
    command: str  # /proc/PID/comm, or the basename of argv[0] when comm is empty


@dataclass(frozen=True, slots=True)
class HeldSocket:
    """A UDP socket already bound on this host.

    ``exact`` is True when the device and V6ONLY come from sock_diag. From /proc alone the
    device is unknown (recorded as ``""``) and so is V6ONLY of ``::`` (recorded as False).
    """

    name: SocketName
    uid: int  # the socket owner's uid, which SO_REUSEPORT compares
    inode: int
    drops: int  # the kernel's per-socket drop counter
    exact: bool
    owner: Owner | None = None


# Where an interface's broadcast address came from: (IPv4 address, prefix length, broadcast).
BroadcastSource = tuple[ipaddress.IPv4Address, int, ipaddress.IPv4Address]


@dataclass(frozen=True, slots=True)
class Interface:
    """One network interface and its addresses (without zone: the interface is the zone).

    ``broadcasts`` are the IPv4 broadcast addresses of its subnets, each once (see
    ``netlink.AddressMessage.subnet_broadcast``). ``broadcast_sources`` is the bookkeeping
    behind them, one entry per address and prefix length: an address that goes away takes its
    broadcast along only when no other address of the interface has the same one. It is left
    out of comparisons, which are about what the interface has, not how it got there.
    """

    name: str
    index: int
    up: bool
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    broadcasts: tuple[ipaddress.IPv4Address, ...] = ()
    broadcast_sources: tuple[BroadcastSource, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ProcRow:
    """One row of /proc/net/udp or /proc/net/udp6."""

    slot: int  # the primary hash slot, shared by udp and udp6
    address: IPAddress
    port: int
    remote_address: IPAddress
    remote_port: int
    state: int
    tx_queue: int
    rx_queue: int
    uid: int
    inode: int
    drops: int


def parse_proc_udp(
    text: str,
    *,
    byteorder: Literal["little", "big"] = sys.byteorder,
    skip_inodes: Collection[int] = _NO_INODES,
) -> list[ProcRow]:
    """Parse the text of /proc/net/udp or /proc/net/udp6.

    The kernel prints each 32-bit word of an address as ``%08X`` of a host-order integer, so
    the bytes inside each word come out in ``byteorder`` (reversed on little-endian hosts).
    Rows of the sockets in ``skip_inodes`` are left out after reading only their inode.

    Raises:
        ValueError: a row does not have the kernel's format.
    """
    rows: list[ProcRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] == "sl":
            continue
        if skip_inodes and _proc_inode(fields) in skip_inodes:
            continue
        try:
            rows.append(_proc_row(fields, byteorder))
        except (ValueError, IndexError) as error:
            raise ValueError(f"line {number}: not a /proc/net/udp row: {line.strip()!r}") from error
    return rows


def _proc_row(fields: list[str], byteorder: Literal["little", "big"]) -> ProcRow:
    if len(fields) < _PROC_COLUMNS or not fields[_COL_SLOT].endswith(":"):
        raise ValueError("too few columns")
    address, port = _proc_endpoint(fields[_COL_LOCAL], byteorder)
    remote_address, remote_port = _proc_endpoint(fields[_COL_REMOTE], byteorder)
    tx_queue, rx_queue = fields[_COL_QUEUES].split(":")
    return ProcRow(
        slot=int(fields[_COL_SLOT][:-1]),
        address=address,
        port=port,
        remote_address=remote_address,
        remote_port=remote_port,
        state=int(fields[_COL_STATE], 16),
        tx_queue=int(tx_queue, 16),
        rx_queue=int(rx_queue, 16),
        uid=int(fields[_COL_UID]),
        inode=int(fields[_COL_INODE]),
        drops=int(fields[_COL_DROPS]),
    )


def _proc_inode(fields: list[str]) -> int | None:
    """The inode column of a row, or None when the row is too short or it is not a number."""
    if len(fields) < _PROC_COLUMNS or not fields[_COL_INODE].isdigit():
        return None  # parsing the row reports it
    return int(fields[_COL_INODE])


def _proc_endpoint(text: str, byteorder: Literal["little", "big"]) -> tuple[IPAddress, int]:
    hex_address, hex_port = text.split(":")
    if len(hex_address) not in (8, 32) or len(hex_port) != 4:
        raise ValueError(f"bad endpoint {text!r}")
    raw = b"".join(
        int(hex_address[i : i + 8], 16).to_bytes(4, byteorder)
        for i in range(0, len(hex_address), 8)
    )
    address: IPAddress = ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw)
    return address, int(hex_port, 16)


def held_socket_from_proc(row: ProcRow) -> HeldSocket | None:
    """The socket a /proc row describes, or None when it has no local port.

    A specific IPv6 address forces V6ONLY on and a v4-mapped one needs it off, so only the
    V6ONLY of ``::`` is a guess here.
    """
    if row.port == 0:
        return None
    address = row.address
    v6only = address.version == 6 and address != IPV6_ANY and address.ipv4_mapped is None
    name = SocketName(address, row.port, "", v6only)
    return HeldSocket(name, row.uid, row.inode, row.drops, exact=False)


def held_socket_from_diag(
    message: netlink.InetDiagMessage, devices: Mapping[int, str]
) -> HeldSocket | None:
    """The socket a sock_diag message describes, or None when it has no local port.

    ``devices`` maps interface indexes to names; an index missing from it (the device went
    away while the socket stayed bound to it) is named ``ifindexN`` so it stays distinct.
    """
    if message.sport == 0:
        return None
    device = ""
    if message.ifindex:
        device = devices.get(message.ifindex, f"ifindex{message.ifindex}")
    v6only = bool(message.v6only) if message.family == socket.AF_INET6 else False
    name = SocketName(message.src, message.sport, device, v6only)
    return HeldSocket(name, message.uid, message.inode, message.drops or 0, exact=True)


def held_sockets(
    *, owners: bool = True, exclude_inodes: Collection[int] = _NO_INODES
) -> list[HeldSocket]:
    """Every UDP socket bound to a port in this network namespace, sorted by socket name.

    sock_diag gives exact devices and V6ONLY; when it is unavailable (no udp_diag module, or
    netlink refused) /proc/net/udp{,6} is read instead and ``exact`` is False.

    Args:
        owners: also find the process holding each socket (a scan of /proc/*/fd).
        exclude_inodes: sockets to leave out, e.g. the caller's own. They are dropped before
            being decoded, which is most of the work when the caller holds thousands. Pass a
            set: it is asked once per socket.

    Raises:
        OSError: neither sock_diag nor /proc/net/udp could be read.
    """
    try:
        found = _diag_sockets(exclude_inodes)
    except OSError:
        found = _proc_sockets(exclude_inodes)
    if owners:
        by_inode = find_owners(held.inode for held in found)
        found = [replace(held, owner=by_inode.get(held.inode)) for held in found]
    return sorted(found, key=lambda held: (held.name.sort_key(), held.inode))


def _diag_sockets(exclude_inodes: Collection[int]) -> list[HeldSocket]:
    messages: list[netlink.InetDiagMessage] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        reply = netlink.dump(
            netlink.NETLINK_SOCK_DIAG,
            netlink.SOCK_DIAG_BY_FAMILY,
            netlink.udp_diag_request(family),
            skip_inodes=exclude_inodes,
        )
        messages.extend(m for m in reply if isinstance(m, netlink.InetDiagMessage))
    devices = {index: _device_name(index) for index in {m.ifindex for m in messages} if index}
    held = (held_socket_from_diag(message, devices) for message in messages)
    return [h for h in held if h is not None]


def _device_name(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"ifindex{index}"


def _proc_sockets(exclude_inodes: Collection[int]) -> list[HeldSocket]:
    found: list[HeldSocket] = []
    for path in PROC_UDP:
        try:
            with open(path, encoding="ascii") as file:
                text = file.read()
        except FileNotFoundError:
            continue  # no udp6 when IPv6 is disabled
        for row in parse_proc_udp(text, skip_inodes=exclude_inodes):
            held = held_socket_from_proc(row)
            if held is not None:
                found.append(held)
    return found


def find_owners(inodes: Iterable[int], *, proc: str = PROC_ROOT) -> dict[int, Owner]:
    """Map socket inodes to a process holding each, by reading /proc/*/fd symlinks.

    Processes that vanish or cannot be read are skipped, so their inodes are simply absent
    (an unknown process). When several processes share a socket the lowest pid wins, except
    that pid 1 comes last: with socket activation, init holds every socket it passed on.
    """
    wanted = set(inodes)
    owners: dict[int, Owner] = {}
    if not wanted:
        return owners
    for pid in _pids(proc):
        hits = _socket_inodes(f"{proc}/{pid}/fd") & (wanted - owners.keys())
        if not hits:
            continue
        command = _command(proc, pid)
        if command is None:
            continue  # gone between reading its fds and its name
        for inode in hits:
            owners[inode] = Owner(pid, command)
        if len(owners) == len(wanted):
            break
    return owners


def _pids(proc: str) -> list[int]:
    try:
        with os.scandir(proc) as entries:
            pids = [int(entry.name) for entry in entries if entry.name.isdigit()]
    except OSError:
        return []
    return sorted(pids, key=lambda pid: (pid == 1, pid))


def _socket_inodes(fd_dir: str) -> set[int]:
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return set()  # exited, or not ours to read
    inodes: set[int] = set()
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith(_SOCKET_LINK_PREFIX) and target.endswith("]"):
            inodes.add(int(target[len(_SOCKET_LINK_PREFIX) : -1]))
    return inodes


def _command(proc: str, pid: int) -> str | None:
    try:
        with open(f"{proc}/{pid}/comm", "rb") as file:
            comm = os.fsdecode(file.read().rstrip(b"\n"))
    except OSError:
        return None
    if comm:
        return comm
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as file:
            argv0 = file.read().split(b"\0", 1)[0]
    except OSError:
        return None
    return os.path.basename(os.fsdecode(argv0))


def interfaces() -> dict[str, Interface]:
    """Every interface of this network namespace with its addresses (RTM_GETLINK + GETADDR).

    Raises:
        OSError: netlink is unavailable or the dump failed.
    """
    links = netlink.dump(netlink.NETLINK_ROUTE, netlink.RTM_GETLINK, netlink.link_dump_request())
    addresses = netlink.dump(
        netlink.NETLINK_ROUTE, netlink.RTM_GETADDR, netlink.address_dump_request()
    )
    return apply_messages({}, [*links, *addresses])


def apply_messages(
    current: Mapping[str, Interface], messages: Iterable[netlink.Message]
) -> dict[str, Interface]:
    """Apply rtnetlink link and address messages, in order, to a table of interfaces.

    Works for a dump (start from ``{}``) and for RTMGRP_LINK/IFADDR events alike. Links are
    matched by index, so a rename keeps the addresses. Addresses whose duplicate-address
    detection failed are left out: they can never be bound. So are tentative ones (DAD still
    running, and not optimistic): bind() refuses them until the kernel announces the address
    again without the flag, which adds it here. Each IPv4 address brings its subnet broadcast
    into ``broadcasts`` and takes it away again when it goes. Other messages are ignored.
    """
    by_index = {interface.index: interface for interface in current.values()}
    for message in messages:
        if isinstance(message, netlink.LinkMessage):
            _apply_link(by_index, message)
        elif isinstance(message, netlink.AddressMessage):
            _apply_address(by_index, message)
    return {interface.name: interface for interface in by_index.values()}


def _apply_link(by_index: dict[int, Interface], message: netlink.LinkMessage) -> None:
    if message.deleted:
        by_index.pop(message.index, None)
        return
    old = by_index.get(message.index)
    name = message.name if message.name is not None else old.name if old else None
    if name is None:
        return
    if old is None:
        by_index[message.index] = Interface(name, message.index, message.up, ())
    else:
        by_index[message.index] = replace(old, name=name, up=message.up)


def _apply_address(by_index: dict[int, Interface], message: netlink.AddressMessage) -> None:
    interface = by_index.get(message.index)
    address = message.local_address
    if interface is None or address is None:
        return
    removed = message.deleted or not usable(message.flags)
    if removed:
        kept = tuple(a for a in interface.addresses if a != address)
    elif address in interface.addresses:
        kept = interface.addresses
    else:
        kept = (*interface.addresses, address)
    sources = interface.broadcast_sources
    if isinstance(address, ipaddress.IPv4Address):
        broadcast = None if removed else message.subnet_broadcast
        entry = None if broadcast is None else (address, message.prefixlen, broadcast)
        sources = _with_source(sources, (address, message.prefixlen), entry)
    if kept == interface.addresses and sources == interface.broadcast_sources:
        return  # announced again, unchanged (IPv6 lifetimes are, often)
    broadcasts = tuple(dict.fromkeys(source[2] for source in sources))
    by_index[message.index] = replace(
        interface, addresses=kept, broadcasts=broadcasts, broadcast_sources=sources
    )


def _with_source(
    sources: tuple[BroadcastSource, ...],
    key: tuple[ipaddress.IPv4Address, int],
    entry: BroadcastSource | None,
) -> tuple[BroadcastSource, ...]:
    """``sources`` with the entry of ``key`` (an address and prefix length, as the kernel tells
    its address entries apart) replaced by ``entry`` in place, added, or dropped when None."""
    found: list[BroadcastSource] = []
    placed = False
    for source in sources:
        if source[:2] != key:
            found.append(source)
        elif entry is not None and not placed:
            found.append(entry)
            placed = True
    if entry is not None and not placed:
        found.append(entry)
    return tuple(found)


def usable(flags: int) -> bool:
    """Whether an address with these IFA_F_* flags can be bound now (without FREEBIND).

    The kernel refuses a tentative IPv6 address (EADDRNOTAVAIL) unless it is optimistic
    (RFC 4429), and never accepts one whose duplicate-address detection failed.
    """
    if flags & netlink.IFA_F_DADFAILED:
        return False
    return not flags & netlink.IFA_F_TENTATIVE or bool(flags & netlink.IFA_F_OPTIMISTIC)


def bindable(address: IPAddress) -> bool:
    """Whether bind() accepts ``address`` now without IP_FREEBIND: the kernel's own answer.

    For addresses no interface lists but the kernel still treats as local: subnet broadcast
    addresses, 127/8 beyond 127.0.0.1, ``local`` routes, ``net.ipv4.ip_nonlocal_bind``. The
    probe binds port 0 (an ephemeral port, so it never disturbs a listener) and closes at
    once; it is never served. Only EADDRNOTAVAIL means no: any other refusal is for the
    real bind() to report.
    """
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
        if isinstance(address, ipaddress.IPv6Address):
            # A v4-mapped address is refused with V6ONLY=1 whatever the host has.
            v6only = address.ipv4_mapped is None
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            probe.bind((str(address), 0))
        except OSError as error:
            return error.errno != errno.EADDRNOTAVAIL
    return True


def udp_hash_entries() -> int:
    """The number of UDP hash slots of this network namespace (16384 when unknown).

    A namespace sharing the initial namespace's table reports the size negated.
    """
    text = _read_sysctl(UDP_HASH_ENTRIES)
    try:
        value = abs(int(text)) if text is not None else 0
    except ValueError:
        value = 0
    return value or DEFAULT_UDP_HASH_ENTRIES


def ip_local_port_range() -> tuple[int, int]:
    """The ephemeral port range bind(port 0) picks from ((32768, 60999) when unknown)."""
    text = _read_sysctl(IP_LOCAL_PORT_RANGE)
    try:
        low, high = (int(word) for word in (text or "").split())
    except ValueError:
        return DEFAULT_LOCAL_PORT_RANGE
    return low, high


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return None
