"""Pausing Python's cyclic garbage collector around bulk work that builds long-lived objects.

Reading a file with 10,000 listeners, or surveying a host with 10,000 sockets, allocates
hundreds of thousands of objects that all stay alive; with the collector on, it scans them
(and every object of a running daemon) again and again, which doubles the time of that work.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block; restore it as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
