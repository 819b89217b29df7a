"""Batched datagram I/O: one recvmmsg and one sendmmsg per socket wake-up, through ctypes.

Owns the preallocated message arrays (mmsghdr, iovec, sockaddr, control, payload slots) that
every socket of the loop shares, and counts each datagram exactly as ``Served.drain`` does.
Linux only: ``available()`` says whether the calls work here, so the loop can fall back to
one recvfrom/sendto per datagram.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import random
import socket
import sys
import time
from typing import Any

from udpbindd.guard import Guard, Verdict
from udpbindd.respond import Reply, echo_reply
from udpbindd.sockets import ICMP_ERRNOS, read_error_queue, reply_source
from udpbindd.stats import Stats

# Datagrams moved by one recvmmsg (and answered by one sendmmsg).
BATCH_SIZE = 64
# Larger than any UDP payload (65,507 over IPv4, 65,527 over IPv6), so nothing is truncated.
SLOT_SIZE = 65536
# Datagrams read from one socket per wake-up, as the plain path's DRAIN_BUDGET.
DRAIN_BUDGET = 64
# sockaddr_storage: room for any peer address the kernel can hand back.
NAME_SIZE = 128
_NAME_WORDS = NAME_SIZE // 8
_SOCKADDR_IN = 16  # the size of an IPv4 peer's address
# One IP_PKTINFO (32 bytes with its header) or IPV6_PKTINFO (40) control message, rounded up.
CONTROL_SIZE = 64
# Each sendmmsg that returns short is retried from the next datagram; EINTR at most this often.
_EINTR_RETRIES = 3
# Where a control message's data starts: after cmsg_len (size_t), cmsg_level and cmsg_type.
_CMSG_DATA = ctypes.sizeof(ctypes.c_size_t) + 8
_DONTWAIT = socket.MSG_DONTWAIT
_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})

Address = tuple[str, int] | tuple[str, int, int, int]


class _IOVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),  # socklen_t
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    )


class _MMsgHdr(ctypes.Structure):
    _fields_ = (("hdr", _MsgHdr), ("len", ctypes.c_uint))


_PTR = ctypes.sizeof(ctypes.c_void_p)
_MMSG = ctypes.sizeof(_MMsgHdr)
_IOV = ctypes.sizeof(_IOVec)


def _offset(struct: type[ctypes.Structure], field: str) -> int:
    descriptor: Any = getattr(struct, field)
    return int(descriptor.offset)


# Byte offsets inside one mmsghdr.
_HDR = _offset(_MMsgHdr, "hdr")
_OFF_NAME = _HDR + _offset(_MsgHdr, "name")
_OFF_NAMELEN = _HDR + _offset(_MsgHdr, "namelen")
_OFF_IOV = _HDR + _offset(_MsgHdr, "iov")
_OFF_IOVLEN = _HDR + _offset(_MsgHdr, "iovlen")
_OFF_CONTROL = _HDR + _offset(_MsgHdr, "control")
_OFF_CONTROLLEN = _HDR + _offset(_MsgHdr, "controllen")
_OFF_LEN = _offset(_MMsgHdr, "len")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # PyDLL keeps the GIL across the call: both calls are non-blocking (MSG_DONTWAIT)
        # and short, and skipping the release and re-take is a measurable share of them.
        libc = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # No argtypes on purpose: converting each argument through them costs about a third
        # of a microsecond per call; the callers pass ints and prebuilt c_void_p objects.
        libc.recvmmsg.restype = ctypes.c_int
        libc.sendmmsg.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def available() -> bool:
    """Whether recvmmsg/sendmmsg can be called here (Linux, libc has them, no seccomp veto).

    Probes both calls once on an unbound socket: a system call filter that refuses them
    (ENOSYS, EPERM) means the plain path must serve.
    """
    libc = _libc()
    if libc is None or ctypes.sizeof(ctypes.c_size_t) != _PTR:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        header = ctypes.byref((_MMsgHdr * 1)())
        received = libc.recvmmsg(probe.fileno(), header, 1, socket.MSG_DONTWAIT, None)
        if received < 0 and ctypes.get_errno() not in (errno.EAGAIN, errno.EWOULDBLOCK):
            return False
        sent = libc.sendmmsg(probe.fileno(), header, 0, socket.MSG_DONTWAIT)
        return bool(sent == 0)


class Batch:
    """Preallocated arrays for ``size`` datagrams, shared by every socket of one loop.

    Memory: ``size`` payload slots of 64 KiB in an anonymous mapping, touched only as far as
    datagrams fill them, plus a few KiB of headers. One instance serves any number of sockets
    (it holds no per-socket state), from one thread.

    Raises:
        OSError: recvmmsg/sendmmsg are not usable here (check ``available()`` first).
    """

    def __init__(self, size: int = BATCH_SIZE) -> None:
        libc = _libc()
        if libc is None or not available():
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available")
        if not 1 <= size <= 1024:  # UIO_MAXIOV: the kernel's cap on one call
            raise ValueError(f"batch size {size} is not in 1..1024")
        self.size = size
        self._recvmmsg = libc.recvmmsg
        self._sendmmsg = libc.sendmmsg
        self._moved = False  # send entries differ from the template and need resetting
        # Payload slots in an anonymous mapping: pages are only backed once a datagram uses
        # them, so 64 small datagrams cost 64 pages, not 4 MiB.
        self._area = mmap.mmap(-1, size * SLOT_SIZE)
        area = memoryview(self._area)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._area))
        self._slots = [area[i * SLOT_SIZE : (i + 1) * SLOT_SIZE] for i in range(size)]
        self._slot_addr = [base + i * SLOT_SIZE for i in range(size)]
        self._names = bytearray(size * NAME_SIZE)
        self._names_view = memoryview(self._names)
        self._name_words = self._names_view.cast("Q")
        names = ctypes.addressof(ctypes.c_char.from_buffer(self._names))
        self._name_addr = [names + i * NAME_SIZE for i in range(size)]
        self._controls = bytearray(size * CONTROL_SIZE)
        self._controls_view = memoryview(self._controls)
        controls = ctypes.addressof(ctypes.c_char.from_buffer(self._controls))
        self._control_addr = [controls + i * CONTROL_SIZE for i in range(size)]

        self._init_receive(size)
        self._init_send(size)

    def _init_receive(self, size: int) -> None:
        # Receive side: entry i reads into slot i, its peer into name i, cmsgs into control i.
        self._rmsg = bytearray(size * _MMSG)
        self._riov = bytearray(size * _IOV)
        rmsg, riov = self._layout(self._rmsg), self._layout(self._riov)
        self._rmsg_ptr = ctypes.c_void_p(rmsg)
        rwords = memoryview(self._rmsg).cast("P")
        riov_words = memoryview(self._riov).cast("P")
        for i in range(size):
            riov_words[2 * i] = self._slot_addr[i]
            riov_words[2 * i + 1] = SLOT_SIZE
            self._point(rwords, i, self._name_addr[i], riov + i * _IOV, self._control_addr[i])
            self._set_lengths(i, self._rmsg, NAME_SIZE, CONTROL_SIZE)
        # Copied back over the used entries before each call: the kernel overwrites the
        # value-result lengths (name, control, flags) of every entry it fills.
        self._rmsg_template = memoryview(bytes(self._rmsg))
        rints = memoryview(self._rmsg).cast("I")
        self._rlen = rints[_OFF_LEN // 4 :: _MMSG // 4]
        self._rnamelen = rints[_OFF_NAMELEN // 4 :: _MMSG // 4]
        self._rcontrollen = rwords[_OFF_CONTROLLEN // _PTR :: _MMSG // _PTR]

    def _init_send(self, size: int) -> None:
        # Send side: entry j answers from slot j to name j unless earlier datagrams of the
        # batch went unanswered; then it is pointed at a later slot and reset afterwards.
        self._smsg = bytearray(size * _MMSG)
        self._siov = bytearray(size * _IOV)
        smsg, siov = self._layout(self._smsg), self._layout(self._siov)
        self._smsg_ptr = [ctypes.c_void_p(smsg + j * _MMSG) for j in range(size)]
        swords = memoryview(self._smsg).cast("P")
        siov_words = memoryview(self._siov).cast("P")
        for j in range(size):
            siov_words[2 * j] = self._slot_addr[j]
            self._point(swords, j, self._name_addr[j], siov + j * _IOV, 0)
            self._set_lengths(j, self._smsg, 0, 0)
        self._smsg_template = memoryview(bytes(self._smsg))
        self._siov_template = memoryview(bytes(self._siov))
        sints = memoryview(self._smsg).cast("I")
        self._slen = sints[_OFF_LEN // 4 :: _MMSG // 4]
        self._snamelen = sints[_OFF_NAMELEN // 4 :: _MMSG // 4]
        self._sname = swords[_OFF_NAME // _PTR :: _MMSG // _PTR]
        self._scontrol = swords[_OFF_CONTROL // _PTR :: _MMSG // _PTR]
        self._scontrollen = swords[_OFF_CONTROLLEN // _PTR :: _MMSG // _PTR]
        self._siov_base = siov_words[0::2]
        self._siov_len = siov_words[1::2]

    @staticmethod
    def _layout(raw: bytearray) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(raw))

    @staticmethod
    def _point(words: memoryview, i: int, name: int, iov: int, control: int) -> None:
        entry = i * _MMSG
        words[(entry + _OFF_NAME) // _PTR] = name
        words[(entry + _OFF_IOV) // _PTR] = iov
        words[(entry + _OFF_IOVLEN) // _PTR] = 1
        words[(entry + _OFF_CONTROL) // _PTR] = control

    @staticmethod
    def _set_lengths(i: int, raw: bytearray, namelen: int, controllen: int) -> None:
        entry = i * _MMSG
        memoryview(raw).cast("I")[(entry + _OFF_NAMELEN) // 4] = namelen
        memoryview(raw).cast("P")[(entry + _OFF_CONTROLLEN) // _PTR] = controllen

    def peer(self, i: int) -> Address:
        """The peer of received entry ``i``, as ``socket.recvfrom`` would give it."""
        start = i * NAME_SIZE
        return unpack_peer(self._names_view[start : start + self._rnamelen[i]].tobytes())

    def drain(
        self,
        sock: socket.socket,
        reply: Reply,
        stats: Stats,
        drop_rate: float = 0.0,
        budget: int = DRAIN_BUDGET,
        *,
        guard: Guard | None = None,
        pktinfo: bool = False,
    ) -> int:
        """Read and answer up to ``budget`` datagrams of ``sock``; return how many receives.

        Counts as ``Served.drain``: every datagram received; simulated drops (one
        ``random.random()`` draw per received datagram when ``drop_rate`` is set, so a seeded
        generator makes both paths drop the same ones); every reply sent, with its bytes; a
        failed receive (a pending error of an earlier send) as the ICMP errors queued on the
        socket, and at least one; each reply the kernel refused as a send error. A ``guard``
        (access lists, rate limit, reflection) judges each datagram before the simulated drop
        and each reply before it is sent, and its refusals are counted under their reasons.
        With ``pktinfo`` (the socket has IP_PKTINFO or IPV6_RECVPKTINFO on, and no other
        control messages), each reply leaves from the address its request was sent to, as
        ``sockets.reply_source`` says.
        """
        fd = sock.fileno()
        count = 0
        while count < budget:
            want = min(budget - count, self.size)
            got = self._recvmmsg(fd, self._rmsg_ptr, want, _DONTWAIT, None)
            if got <= 0:
                if got == 0 or ctypes.get_errno() in _AGAIN:
                    break
                # A pending socket error (an ICMP error about an earlier reply) is reported
                # once by the next receive; the error queue says how many there were and is
                # emptied, or the socket would poll as ready for ever. It counts against the
                # budget too.
                count += 1
                stats.send_errors += max(1, read_error_queue(sock, DRAIN_BUDGET))
                continue
            count += got
            answers, sent_bytes = self._answer(
                got, reply, stats, drop_rate=drop_rate, guard=guard, pktinfo=pktinfo
            )
            if answers:
                sent = self._sendmmsg(fd, self._smsg_ptr[0], answers, _DONTWAIT)
                if sent == answers:
                    stats.sent_packets += sent
                    stats.sent_bytes += sent_bytes
                else:
                    self._send_rest(sock, sent, answers, stats)
            if self._moved:
                self._smsg[:] = self._smsg_template
                self._siov[:] = self._siov_template
                self._moved = False
            if got < want:
                break  # the queue is empty: spare the receive that would say so
        if guard is not None:
            stats.rate_limit_evictions += guard.take_evictions()
        return count

    def _answer(
        self,
        got: int,
        reply: Reply,
        stats: Stats,
        *,
        drop_rate: float,
        guard: Guard | None,
        pktinfo: bool,
    ) -> tuple[int, int]:
        """Build the replies to the ``got`` datagrams received; return (replies, their bytes).

        Reply ``j`` goes in send entry ``j``; it is moved off its own slot's entry only when
        an earlier datagram of the batch went unanswered.
        """
        rlen, rnamelen, slots = self._rlen, self._rnamelen, self._slots
        snamelen, siov_len = self._snamelen, self._siov_len
        names, name_words = self._names_view, self._name_words
        chance = random.random  # simulated loss needs no cryptographic randomness
        now = time.monotonic_ns() if guard is not None else 0
        # The guard that judges replies too (their size), if any.
        judge = guard if guard is not None and guard.checks_replies else None
        # Echo answers with the request itself, already in the slot sendmmsg reads.
        in_place = reply is echo_reply
        name: bytes | int = b""
        received_bytes = sent_bytes = dropped = answers = 0
        for i in range(got):
            n = rlen[i]
            received_bytes += n
            if guard is not None:
                # Judged by the raw peer name: decoding it to text costs more than the rest
                # of the datagram's work together, and the guard needs that only once a peer.
                # An IPv4 peer's family, port and address are the first 8 bytes of its
                # sockaddr_in: one machine word, read as an int.
                length = rnamelen[i]
                if length == _SOCKADDR_IN:
                    name = name_words[i * _NAME_WORDS]
                else:
                    start = i * NAME_SIZE
                    name = names[start : start + length].tobytes()
                verdict = guard.check_name(name, now, host_port)
                if verdict is not None:
                    stats.refused(verdict)
                    continue
            if drop_rate and chance() < drop_rate:
                dropped += 1
                continue
            if in_place:
                size = n
            else:
                size = self._place(slots[i], n, reply, stats, judge=judge, name=name)
                if size < 0:
                    continue
            if answers != i:
                self._sname[answers] = self._name_addr[i]
                self._siov_base[answers] = self._slot_addr[i]
                self._moved = True
            snamelen[answers] = rnamelen[i]
            siov_len[answers] = size
            if pktinfo:
                self._attach_control(answers, i)
            sent_bytes += size
            answers += 1
        # The kernel rewrote the value-result lengths of the entries it filled.
        used = got * _MMSG
        self._rmsg[:used] = self._rmsg_template[:used]
        stats.received_packets += got
        stats.received_bytes += received_bytes
        stats.dropped_simulated += dropped
        return answers, sent_bytes

    @staticmethod
    def _place(
        slot: memoryview,
        n: int,
        reply: Reply,
        stats: Stats,
        *,
        judge: Guard | None,
        name: bytes | int,
    ) -> int:
        """Write the reply to the ``n``-byte request in ``slot`` over it; return its size.

        -1 when there is none to send: the responder gave none, the guard ``judge`` refused
        its size (counted), or it is larger than any datagram (counted as a send error).
        """
        data = reply(slot, n)
        if data is None:
            return -1
        size = len(data)
        if judge is not None and not judge.reply_ok_name(name, n, size):
            stats.refused(Verdict.REFLECTION)
            return -1
        if size > SLOT_SIZE:
            # Larger than any UDP datagram: the kernel would refuse it (EMSGSIZE).
            stats.send_errors += 1
            return -1
        # A memoryview assignment is a memmove: a reply that is a slice of its own request
        # may overlap the place it is copied to.
        slot[:size] = data
        return size

    def _attach_control(self, j: int, i: int) -> None:
        """Make reply ``j`` leave from the address request ``i`` was sent to (its packet info).

        The received control message is rewritten in place into what ``reply_source`` gives
        the plain path, so both paths answer from the same address; none when it says none.
        """
        length = self._rcontrollen[i]
        if not length:
            return
        start = i * CONTROL_SIZE
        cmsg = self._controls_view[start : start + length]
        cmsg_len = int.from_bytes(cmsg[0:_PTR], sys.byteorder)
        level = int.from_bytes(cmsg[_PTR : _PTR + 4], sys.byteorder)
        kind = int.from_bytes(cmsg[_PTR + 4 : _PTR + 8], sys.byteorder)
        source = reply_source([(level, kind, bytes(cmsg[_CMSG_DATA:cmsg_len]))])
        if not source:
            return
        data = source[0][2]
        cmsg[_CMSG_DATA : _CMSG_DATA + len(data)] = data
        self._scontrol[j] = self._control_addr[i]
        self._scontrollen[j] = length
        self._moved = True

    def _send_rest(self, sock: socket.socket, result: int, answers: int, stats: Stats) -> None:
        """After a short sendmmsg: count what went and what was refused; send the rest.

        sendmmsg stops at the first datagram the kernel refuses (ECONNREFUSED, ENOBUFS,
        EAGAIN, EMSGSIZE, EPERM...) and returns how many went before it, or -1 with the
        reason if it was the first. The plain path counts that one and goes on with the
        next, so here the rest is sent again from the refused one, which reports its reason.
        As on the plain path, a refusal that is an ICMP error about an earlier reply counts
        the queued ICMP errors instead and the reply is tried once more; a short count can
        have swallowed such an error, so the error queue is read after one too.
        """
        fd = sock.fileno()
        slen = self._slen
        start = interrupted = 0
        retried = -1  # the entry already tried again after an ICMP error
        while True:
            if result > 0:
                stats.sent_packets += result
                stats.sent_bytes += sum(slen[start : start + result])
                start += result
                if start < answers and retried != start and _icmp_counted(sock, stats):
                    retried = start
            else:
                code = ctypes.get_errno()
                if code == errno.EINTR and interrupted < _EINTR_RETRIES:
                    interrupted += 1  # interrupted before anything went: not a refusal
                elif code in ICMP_ERRNOS and retried != start and _icmp_counted(sock, stats):
                    retried = start
                else:
                    stats.send_errors += 1
                    start += 1
            if start >= answers:
                return
            result = self._sendmmsg(fd, self._smsg_ptr[start], answers - start, _DONTWAIT)


def _icmp_counted(sock: socket.socket, stats: Stats) -> bool:
    """Count the ICMP errors queued on ``sock`` as send errors; whether there were any."""
    icmp = read_error_queue(sock, DRAIN_BUDGET)
    stats.send_errors += icmp
    return icmp > 0


def unpack_peer(name: bytes) -> Address:
    """A peer's raw socket address (sockaddr_in or sockaddr_in6) as recvfrom gives it."""
    family = int.from_bytes(name[0:2], sys.byteorder)
    port = int.from_bytes(name[2:4], "big")
    if family == socket.AF_INET6:
        flowinfo = int.from_bytes(name[4:8], "big")
        scope = int.from_bytes(name[24:28], sys.byteorder)
        return (socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flowinfo, scope)
    return (socket.inet_ntop(socket.AF_INET, name[4:8]), port)


def host_port(name: bytes | int) -> tuple[str, int]:
    """What the guard judges a peer by: its address text and port.

    ``name`` is the raw sockaddr, or for IPv4 its first 8 bytes as a native int.
    """
    if isinstance(name, int):
        name = name.to_bytes(8, sys.byteorder)
    peer = unpack_peer(name)
    return peer[0], peer[1]
