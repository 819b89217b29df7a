"""A worker that binds UDP sockets for the kernel-oracle tests; run inside a test namespace.

Protocol: one JSON request per stdin line, one JSON reply per stdout line (see tests/netns.py).

- A JSON **list** of socket specs is one case. The sockets are created and bound in order, each
  with its options set before bind(); the ones that bind stay open until the whole case is done,
  then all are closed. Reply: ``{"results": [...], "details": [...]}``, where each result is
  ``"ok"`` or the errno name (``"EADDRINUSE"``, ``"EINVAL"``, ``"EADDRNOTAVAIL"``, ...), and each
  detail is ``null`` or, for a bound socket, what the kernel reports back:
  ``{"device": "vb0" or "", "v6only": bool or null, "uid": int}``.
  A spec is ``{"family": 4 or 6, "address": "fe80::1%vb0", "port": 20000, "v6only": false,
  "device": "", "reuse_addr": false, "reuse_port": false, "uid": 0}``; only family, address and
  port are required. An entry ``{"close": i}`` instead closes the socket of entry ``i`` of the
  same list; its result is ``"closed"``, or ``"not-open"`` if that socket did not bind.
- ``{"sysctl": "net.ipv4.udp_hash_entries"}`` replies ``{"value": "-16384"}``: the value as the
  namespace sees it (negative here because a child namespace shares the host's table).

A request the worker cannot understand gets ``{"error": "..."}`` rather than silence.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from typing import Any

# Bounds every wait for a socket factory child to answer.
CHILD_TIMEOUT = 5.0


class _Factory:
    """A forked child running as another uid that creates UDP sockets and passes them back.

    SO_REUSEPORT compares the sockets' owners, and the owner (sk_uid) is fixed at socket() time,
    not at bind(): so a socket for another uid must be created by a process running as that uid.
    The worker still sets the options and binds. One child per uid lives as long as the worker,
    because a fork per socket would dominate the run time; it exits when its channel closes.
    """

    def __init__(self, uid: int) -> None:
        # SOCK_SEQPACKET keeps one request per message.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the child; it never returns
            code = 1
            try:
                # Drop every inherited descriptor (stdin, stdout, the case's bound sockets):
                # a copy held here would keep a "closed" socket bound.
                keep = theirs.fileno()
                os.closerange(0, keep)
                os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
                os.setresuid(uid, uid, uid)
                while request := theirs.recv(16):
                    with socket.socket(int(request), socket.SOCK_DGRAM) as made:
                        socket.send_fds(theirs, [b"socket"], [made.fileno()])
                    # Only now is the worker's copy the last one: until this child closed its
                    # own, closing the worker's copy would leave the socket bound.
                    theirs.send(b"closed")
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        ours.settimeout(CHILD_TIMEOUT)
        self.uid = uid
        self.pid = pid
        self._channel = ours

    def socket(self, family: int) -> socket.socket:
        self._channel.send(str(int(family)).encode())
        _, fds, _, _ = socket.recv_fds(self._channel, 16, 1)
        if len(fds) != 1:
            raise RuntimeError(f"the socket factory for uid {self.uid} passed no socket")
        made = socket.socket(fileno=fds[0])
        if self._channel.recv(16) != b"closed":
            made.close()
            raise RuntimeError(f"the socket factory for uid {self.uid} kept its copy")
        return made

    def close(self) -> None:
        self._channel.close()  # the child sees EOF and exits
        os.waitpid(self.pid, 0)


_factories: dict[int, _Factory] = {}


def _socket_owned_by(uid: int, family: int) -> socket.socket:
    """A UDP socket whose owner uid (sk_uid) is ``uid``."""
    if uid == os.geteuid():
        return socket.socket(family, socket.SOCK_DGRAM)
    if uid not in _factories:
        _factories[uid] = _Factory(uid)
    return _factories[uid].socket(family)


def _sockaddr(family: int, address: str, port: int) -> tuple[Any, ...]:
    # getaddrinfo turns a "%zone" suffix into the sin6_scope_id the kernel needs.
    infos = socket.getaddrinfo(address, port, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
    return infos[0][4]


def _details(sock: socket.socket) -> dict[str, Any]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 64)
    v6only = None
    if sock.family == socket.AF_INET6:
        v6only = bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return {
        "device": raw.split(b"\0", 1)[0].decode(),
        "v6only": v6only,
        "uid": os.fstat(sock.fileno()).st_uid,
    }


def _bind_one(spec: dict[str, Any]) -> tuple[socket.socket | None, str]:
    family = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
    sock = _socket_owned_by(int(spec.get("uid", 0)), family)
    try:
        if family == socket.AF_INET6:
            # Always explicit, so results never depend on net.ipv6.bindv6only.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(spec.get("v6only", 0)))
        if spec.get("reuse_addr"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec.get("reuse_port"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if spec.get("device"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, spec["device"].encode())
        sock.bind(_sockaddr(family, spec["address"], int(spec["port"])))
    except OSError as exc:
        sock.close()
        if exc.errno is None:
            return None, type(exc).__name__
        return None, errno.errorcode.get(exc.errno, str(exc.errno))
    except BaseException:
        sock.close()
        raise
    return sock, "ok"


def run_case(specs: list[dict[str, Any]]) -> dict[str, Any]:
    """Bind the sockets in order, keep the bound ones open until the end, then close all."""
    held: dict[int, socket.socket] = {}
    results: list[str] = []
    details: list[Any] = []
    try:
        for index, spec in enumerate(specs):
            if "close" in spec:
                sock = held.pop(int(spec["close"]), None)
                results.append("not-open" if sock is None else "closed")
                details.append(None)
                if sock is not None:
                    sock.close()
                continue
            sock, result = _bind_one(spec)
            if sock is not None:
                held[index] = sock
            results.append(result)
            details.append(None if sock is None else _details(sock))
    finally:
        for sock in held.values():
            sock.close()
    return {"results": results, "details": details}


def handle(request: Any) -> dict[str, Any]:
    if isinstance(request, list):
        return run_case(request)
    if isinstance(request, dict) and "sysctl" in request:
        name = str(request["sysctl"]).replace(".", "/")
        with open(os.path.join("/proc/sys", name)) as file:
            return {"value": file.read().strip()}
    return {"error": f"unknown request {request!r}"}


def main() -> int:
    try:
        for line in sys.stdin:
            try:
                reply = handle(json.loads(line))
            except Exception as exc:  # every failure is reported, never swallowed
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        for factory in _factories.values():
            factory.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
