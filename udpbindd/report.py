"""What ``udpbindd check`` prints: the table of socket names and every clash, as text or JSON.

Pure: a ``Survey`` in, a string out. Each socket name is ``ok`` (it would bind now), ``clash``
or ``waiting`` (its address or interface is absent now: ``run`` binds it when it appears).
"""

from __future__ import annotations

import json
from typing import Any

from udpbindd.clash import Clash
from udpbindd.config import Listener
from udpbindd.expand import Binding
from udpbindd.host import HeldSocket
from udpbindd.names import address_text, label
from udpbindd.survey import Survey


def _family(binding: Binding) -> str:
    name = binding.name
    if name.family == 4:
        return "ipv4"
    return "dual" if name.dual_stack else "ipv6"


def _state(clash: Clash | None, absent: str | None) -> str:
    if clash is not None:
        return "clash"
    return "ok" if absent is None else "waiting"


def _row(binding: Binding, clash: Clash | None, absent: str | None = None) -> dict[str, Any]:
    name, listener = binding.name, binding.listener
    return {
        "listener": listener.name,
        "socket": label(name),
        "address": address_text(name.address),
        "port": name.port,
        "family": _family(binding),
        "v6only": name.v6only if name.family == 6 else None,
        "device": name.device or None,
        "responder": listener.responder.value,
        "reuse_port": listener.reuse_port,
        "freebind": listener.freebind,
        "required": listener.required,
        "state": _state(clash, absent),
    }


def _party(other: Binding | HeldSocket) -> dict[str, Any]:
    if isinstance(other, Binding):
        return {"kind": "listener", "listener": other.listener.name, "socket": label(other.name)}
    owner = other.owner
    return {
        "kind": "process",
        "socket": label(other.name),
        "pid": owner.pid if owner else None,
        "command": owner.command if owner else None,
        "uid": other.uid,
        "inode": other.inode,
    }


def _waiting(survey: Survey) -> list[tuple[Listener, str, str]]:
    """(listener, socket, reason) of every socket that waits: absent addresses and interfaces.

    A listener that stands for no socket is named by what it asked for (``eth0 port 53``),
    as in the daemon's logs and metrics.
    """
    found = [
        (u.listener, f"{u.listener.interface} port {u.listener.port}", u.reason)
        for u in survey.expansion.unresolved
    ]
    clashing = survey.clashing
    found += [
        (a.binding.listener, label(a.binding.name), a.reason)
        for a in survey.absent
        if a.binding not in clashing
    ]
    return found


def as_json(survey: Survey, source: str) -> str:
    clashes = {clash.binding: clash for clash in survey.clashes}
    absent = {item.binding: item.reason for item in survey.absent}
    document = {
        "source": source,
        "host_checked": survey.host_checked,
        "ok": ok(survey),
        "bindings": [_row(b, clashes.get(b), absent.get(b)) for b in survey.expansion.bindings],
        "unresolved": [
            {"listener": u.listener.name, "required": u.listener.required, "reason": u.reason}
            for u in survey.expansion.unresolved
        ],
        "waiting": [
            {
                "listener": listener.name,
                "socket": socket,
                "required": listener.required,
                "bind_timeout": listener.bind_timeout,
                "reason": reason,
            }
            for listener, socket, reason in _waiting(survey)
        ],
        "clashes": [
            {
                "listener": clash.binding.listener.name,
                "socket": label(clash.binding.name),
                "with": _party(clash.other),
                "overlap": clash.overlap.name.lower(),
                "certain": clash.certain,
                "message": clash.headline,
                "why": clash.why,
                "fix": clash.fix,
            }
            for clash in survey.clashes
        ],
    }
    return json.dumps(document, indent=2)


def as_text(survey: Survey, source: str) -> str:
    clashes = {clash.binding: clash for clash in survey.clashes}
    absent = {item.binding: item.reason for item in survey.absent}
    rows = [_row(b, clashes.get(b), absent.get(b)) for b in survey.expansion.bindings]
    columns = ("listener", "socket", "family", "device", "responder", "state")
    header = {column: column.upper() for column in columns}
    cells = [header] + [{c: str(r[c] if r[c] is not None else "-") for c in columns} for r in rows]
    widths = {c: max(len(cell[c]) for cell in cells) for c in columns}
    lines = [f"{source}: {len(rows)} socket name(s)"]
    lines += ["  ".join(cell[c].ljust(widths[c]) for c in columns).rstrip() for cell in cells]
    for listener, socket, reason in _waiting(survey):
        lines.append(
            f"waiting: listener {listener.name!r} ({socket}): {reason}; {_until(listener)}"
        )
    for clash in survey.clashes:
        lines.append("")
        lines.append(f"clash: {clash.headline}")
        lines.append(f"  why: {clash.why}")
        if not clash.certain:
            lines.append("  note: assumed, from what /proc can show of the other socket")
        lines.append(f"  fix: {clash.fix}")
    if not survey.host_checked:
        lines.append("")
        lines.append("note: sockets held by other processes were not checked (--no-host)")
    lines.append("")
    lines.append(_verdict(survey))
    return "\n".join(lines) + "\n"


def _until(listener: Listener) -> str:
    """What ``run`` does about a socket that waits, for the ``waiting:`` line."""
    if not listener.required:
        return "bound when it appears (not required: start-up does not wait)"
    if listener.bind_timeout == 0:
        return "required with bind_timeout 0: run would fail at once"
    return f"bound when it appears; start-up waits for it up to {listener.bind_timeout:g} s"


def _verdict(survey: Survey) -> str:
    waiting = len(_waiting(survey))
    note = f"; {waiting} socket(s) waiting for an address or interface" if waiting else ""
    if ok(survey):
        return f"ok: no clashes{note}"
    found = [f"{len(survey.clashes)} clash(es) found"] if survey.clashes else []
    missing = len(_never_waited(survey))
    if missing:
        found.append(f"{missing} required listener(s) absent, with bind_timeout 0")
    return "; ".join(found) + note


def _never_waited(survey: Survey) -> list[Listener]:
    """Required listeners that wait with ``bind_timeout: 0``: ``run`` would fail at once."""
    return [
        listener
        for listener, _, _ in _waiting(survey)
        if listener.required and listener.bind_timeout == 0
    ]


def ok(survey: Survey) -> bool:
    """Whether ``run`` would bind every required listener as far as can be told beforehand.

    A socket that waits for its address or interface is no failure: ``run`` waits for it
    (up to ``bind_timeout`` at start-up), unless that timeout is 0.
    """
    return not survey.clashes and not _never_waited(survey)
