"""A UDP client worker for the interface tests; run inside a test namespace (see tests/netns.py).

Protocol: one JSON request per stdin line, one JSON reply per stdout line. Times are this
process's ``time.monotonic()``, the same clock as the test's (a network namespace does not
change it), so the test can measure from its own timestamps.

- ``{"poll": [host, port], "until": T, "every": 0.02}``: send a datagram every ``every``
  seconds until one is answered or ``time.monotonic()`` passes ``until``. Reply
  ``{"reply": text or null, "at": time of the reply or null, "tries": n}``.
- ``{"exchange": [host, port], "timeout": 1.0, "source": address or null}``: one datagram.
  Reply ``{"reply": text or null, "error": errno name or null}``.
- ``{"hold": [host, port]}``: bind a UDP socket there and keep it; ``{"release": [host,
  port]}`` closes it. Reply ``{"ok": true}`` or ``{"error": errno name}``.
- ``{"scrape": port}``: GET http://127.0.0.1:PORT/metrics. Reply ``{"text": body}``.
- ``{"spoof": [host, port], "source": [address, port]}``: one IPv4 datagram whose source is
  any address, even one no socket could send from (a broadcast), built whole and sent on a
  raw socket (needs CAP_NET_RAW). Nothing can be received for it. Reply ``{"ok": true}``.

Hosts may carry a zone (``fe80::1%vb1``): addresses go through getaddrinfo, which sets the
scope id a link-local address needs.
"""

from __future__ import annotations

import errno
import json
import socket
import struct
import sys
import time
import urllib.request
from typing import Any

PAYLOAD = b"are you there?"


def _address(host: str, port: int) -> tuple[int, Any]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    info = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    return family, info[0][4]


def _try(
    family: int, address: Any, timeout: float, source: str | None
) -> tuple[bytes | None, str | None]:
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if source is not None:
            sock.bind(_address(source, 0)[1])
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            sock.send(PAYLOAD)
            return sock.recv(65536), None
        except TimeoutError:
            return None, None
        except OSError as error:
            return None, errno.errorcode.get(error.errno or 0, str(error))


def spoof(host: str, port: int, source: str, source_port: int) -> None:
    """Send PAYLOAD from ``source``:``source_port`` to ``host``:``port`` over a raw socket.

    The kernel fills in the IP header's checksum and id; a UDP checksum of 0 means none.
    """
    udp = struct.pack("!HHHH", source_port, port, 8 + len(PAYLOAD), 0) + PAYLOAD
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # IPv4, a 20-byte header
        0,
        20 + len(udp),
        0,
        0,
        64,
        socket.IPPROTO_UDP,
        0,
        socket.inet_aton(source),
        socket.inet_aton(host),
    )
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + udp, (host, 0))


def poll(host: str, port: int, until: float, every: float) -> dict[str, Any]:
    family, address = _address(host, port)
    tries = 0
    while True:
        began = time.monotonic()
        if began > until:
            return {"reply": None, "at": None, "tries": tries}
        tries += 1
        reply, _ = _try(family, address, every, None)
        if reply is not None:
            return {"reply": reply.decode(errors="replace"), "at": time.monotonic(), "tries": tries}
        # A refused datagram returns at once: keep to one try per ``every``.
        time.sleep(max(0.0, began + every - time.monotonic()))


def main() -> None:
    held: dict[str, socket.socket] = {}
    try:
        for line in sys.stdin:
            request = json.loads(line)
            answer: dict[str, Any]
            if "poll" in request:
                host, port = request["poll"]
                answer = poll(host, port, request["until"], request.get("every", 0.02))
            elif "exchange" in request:
                host, port = request["exchange"]
                family, address = _address(host, port)
                reply, error = _try(
                    family, address, request.get("timeout", 1.0), request.get("source")
                )
                text = None if reply is None else reply.decode(errors="replace")
                answer = {"reply": text, "error": error}
            elif "hold" in request:
                host, port = request["hold"]
                family, address = _address(host, port)
                sock = socket.socket(family, socket.SOCK_DGRAM)
                try:
                    sock.bind(address)
                except OSError as error:
                    sock.close()
                    answer = {"error": errno.errorcode.get(error.errno or 0, str(error))}
                else:
                    held[f"{host}:{port}"] = sock
                    answer = {"ok": True}
            elif "release" in request:
                host, port = request["release"]
                held.pop(f"{host}:{port}").close()
                answer = {"ok": True}
            elif "spoof" in request:
                host, port = request["spoof"]
                source, source_port = request["source"]
                spoof(host, port, source, source_port)
                answer = {"ok": True}
            elif "scrape" in request:
                url = f"http://127.0.0.1:{request['scrape']}/metrics"
                with urllib.request.urlopen(url, timeout=5) as response:
                    answer = {"text": response.read().decode()}
            else:
                answer = {"error": f"unknown request {request!r}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        for sock in held.values():
            sock.close()


if __name__ == "__main__":
    main()
