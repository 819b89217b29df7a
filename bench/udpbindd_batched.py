"""Bench-only server: udpbindd's serving loop with the batched path (udpbindd.batch) or the
plain one (``Served.drain``), over the daemon's own sockets, responders and counters.

It stands in for the daemon until ``Daemon.run`` drains through ``udpbindd.batch``: no
configuration file, clash check, metrics endpoint or systemd notification, only the loop.
Usage: python bench/udpbindd_batched.py HOST PORT [--ports N] [--plain] [--no-adaptive]
Prints "ready" once every socket is bound; serves until killed (SIGTERM, SIGINT).
"""

from __future__ import annotations

import argparse
import ipaddress
import selectors
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from udpbindd import batch
from udpbindd.config import DEFAULT_RECV_BUFFER, Listener, Literal, Responder
from udpbindd.daemon import BUFFER_SIZE, DRAIN_BUDGET, Served
from udpbindd.expand import Binding
from udpbindd.names import SocketName
from udpbindd.sockets import Options, open_udp

# With at least this many sockets ready at once, load is spread thin: each socket holds about
# one datagram, and one plain recvfrom/sendto (no closing receive, budget 1) costs less than
# the two ctypes calls of a batch. Below it, each ready socket is drained in batches.
SPREAD = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--ports", type=int, default=1, help="serve PORT..PORT+N-1")
    parser.add_argument("--plain", action="store_true", help="one recvfrom/sendto per datagram")
    parser.add_argument(
        "--no-adaptive", action="store_true", help="batches even when many sockets are ready"
    )
    parser.add_argument("--responder", default="echo", choices=[r.value for r in Responder])
    args = parser.parse_args()
    # Stop cleanly on SIGTERM: the loop's select() returns with InterruptedError handled by
    # selectors, then the flag ends it.
    running = [True]

    def stop(signum: int, frame: object) -> None:
        running[0] = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    address = ipaddress.ip_address(args.host)
    selector = selectors.DefaultSelector()
    served: list[Served] = []
    for port in range(args.port, args.port + args.ports):
        listener = Listener(
            name=f"bench-{port}",
            interface=args.host,
            target=Literal(address),
            port=port,
            responder=Responder(args.responder),
        )
        name = SocketName(address, port, "", v6only=address.version == 6)
        sock, granted = open_udp(name, Options(recv_buffer=DEFAULT_RECV_BUFFER))
        item = Served(Binding(listener, name), sock, granted)
        selector.register(sock, selectors.EVENT_READ, item)
        served.append(item)
    plain = args.plain or not batch.available()
    print("ready plain" if plain else "ready batched", flush=True)

    buffer = bytearray(BUFFER_SIZE)
    view = memoryview(buffer)
    fast = None if plain else batch.Batch()
    select = selector.select
    adaptive = not args.no_adaptive
    try:
        while running[0]:
            ready = select(1.0)
            if fast is None or (adaptive and len(ready) >= SPREAD):
                budget = 1 if fast is not None else DRAIN_BUDGET
                for key, _ in ready:
                    key.data.drain(buffer, view, budget)
            else:
                drain = fast.drain
                for key, _ in ready:
                    item = key.data
                    drain(item.sock, item.reply, item.stats, item.drop_rate, DRAIN_BUDGET)
    finally:
        total = sum(item.stats.received_packets for item in served)
        answered = sum(item.stats.sent_packets for item in served)
        drops = sum(item.kernel_drops() or 0 for item in served)
        print(f"received={total} sent={answered} kernel_drops={drops}", flush=True)
        for item in served:
            item.sock.close()
        selector.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
