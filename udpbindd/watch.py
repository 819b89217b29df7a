"""The interface watch: the host's interface table, kept current from rtnetlink events.

A NETLINK_ROUTE socket joined to the link and address groups, registered in the daemon's
selector like any listener: no thread, no polling. The subscription is made before the
table is dumped, so no change can fall between the two. Decoding and applying the messages
are the pure ``netlink`` parsers and ``host.apply_messages``; this module only reads.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Mapping

import structlog

from udpbindd import host, netlink
from udpbindd.names import IPAddress

log = structlog.get_logger("udpbindd")

GROUPS = netlink.RTMGRP_LINK | netlink.RTMGRP_IPV4_IFADDR | netlink.RTMGRP_IPV6_IFADDR
# Room for the burst of messages an interface with many addresses sends as it goes away. The
# kernel grants at most net.core.rmem_max; an overrun is survived anyway, by a fresh dump.
RECEIVE_BUFFER = 4 * 1024 * 1024
# Datagrams read per wake-up; more wait for the next pass, so a flood cannot hold the loop.
READ_BUDGET = 256

View = dict[str, tuple[int, frozenset[IPAddress]]]


def view(table: Mapping[str, host.Interface]) -> View:
    """What listeners depend on: each interface's index and addresses (not its up flag).

    An IPv4 address on a down interface stays bindable, and the kernel removes IPv6 ones
    itself (with RTM_DELADDR), so a link going down or up alone changes nothing here.
    """
    return {name: (item.index, frozenset(item.addresses)) for name, item in table.items()}


class InterfaceWatch:
    """An rtnetlink subscription and the interface table it keeps current.

    Raises:
        OSError: netlink is unavailable, or the first dump failed (the socket is closed).
    """

    def __init__(self) -> None:
        self.sock = netlink.open_socket(netlink.NETLINK_ROUTE, GROUPS)
        try:
            self.sock.setblocking(False)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self.table: dict[str, host.Interface] = host.interfaces()
        except OSError:
            self.sock.close()
            raise
        self.events = 0  # messages applied since start, for the logs
        self.dumps = 1
        self.lost = False  # events were lost and the dump to recover failed: try it again

    def fileno(self) -> int:
        return self.sock.fileno()

    def addresses(self) -> dict[str, tuple[IPAddress, ...]]:
        """Each interface with its usable addresses, as ``expand`` takes them."""
        return {name: item.addresses for name, item in self.table.items()}

    def broadcasts(self) -> frozenset[ipaddress.IPv4Address]:
        """Every interface's IPv4 subnet broadcast addresses, which the reflection guard refuses
        as sources (they are not in ``view``: a change to them alone rebinds nothing)."""
        return frozenset(address for item in self.table.values() for address in item.broadcasts)

    def index(self, name: str) -> int | None:
        """The index of interface ``name`` now, or None when it does not exist."""
        item = self.table.get(name)
        return None if item is None else item.index

    def read(self) -> bool:
        """Apply every message waiting on the socket; True when a listener may be affected.

        A lost message (the receive queue overran: ENOBUFS) or one that cannot be decoded
        leaves the table unknowable from events alone, so the whole table is dumped again.

        Raises:
            OSError: a fresh dump was needed and failed; the table is left as it was, and
                the next ``read`` dumps again.
        """
        before = view(self.table)
        messages: list[netlink.Message] = []
        resync = self.lost
        for _ in range(READ_BUDGET):
            try:
                data, _, flags, _ = self.sock.recvmsg(netlink.RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                resync = True
                continue
            if flags & socket.MSG_TRUNC:
                resync = True
                continue
            try:
                messages.extend(netlink.parse_messages(data))
            except netlink.NetlinkParseError as error:
                log.warning("interface_event_unreadable", error=str(error))
                resync = True
        if resync:
            self.lost = True
            self.table = host.interfaces()
            self.lost = False
            self.dumps += 1
            log.warning("interface_events_lost", detail="the interface table was read again")
        else:
            self.table = host.apply_messages(self.table, messages)
        self.events += len(messages)
        return view(self.table) != before

    def close(self) -> None:
        self.sock.close()
