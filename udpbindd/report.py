"""What ``udpbindd check`` prints: the table of socket names and every clash, as text or JSON.

Pure: a ``Survey`` in, a string out.
"""

from __future__ import annotations

import json
from typing import Any

from udpbindd.clash import Clash
from udpbindd.expand import Binding
from udpbindd.host import HeldSocket
from udpbindd.names import address_text, label
from udpbindd.survey import Survey


def _family(binding: Binding) -> str:
    name = binding.name
    if name.family == 4:
        return "ipv4"
    return "dual" if name.dual_stack else "ipv6"


def _row(binding: Binding, clash: Clash | None) -> dict[str, Any]:
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
        "state": "ok" if clash is None else "clash",
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


def as_json(survey: Survey, source: str) -> str:
    clashes = {clash.binding: clash for clash in survey.clashes}
    document = {
        "source": source,
        "host_checked": survey.host_checked,
        "ok": ok(survey),
        "bindings": [_row(b, clashes.get(b)) for b in survey.expansion.bindings],
        "unresolved": [
            {"listener": u.listener.name, "required": u.listener.required, "reason": u.reason}
            for u in survey.expansion.unresolved
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
    rows = [_row(b, clashes.get(b)) for b in survey.expansion.bindings]
    columns = ("listener", "socket", "family", "device", "responder", "state")
    header = {column: column.upper() for column in columns}
    cells = [header] + [{c: str(r[c] if r[c] is not None else "-") for c in columns} for r in rows]
    widths = {c: max(len(cell[c]) for cell in cells) for c in columns}
    lines = [f"{source}: {len(rows)} socket name(s)"]
    lines += ["  ".join(cell[c].ljust(widths[c]) for c in columns).rstrip() for cell in cells]
    for item in survey.expansion.unresolved:
        tag = "error" if item.listener.required else "warning"
        lines.append(f"{tag}: listener {item.listener.name!r}: {item.reason}")
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


def _verdict(survey: Survey) -> str:
    if ok(survey):
        return "ok: no clashes"
    missing = sum(1 for u in survey.expansion.unresolved if u.listener.required)
    found = [f"{len(survey.clashes)} clash(es) found"] if survey.clashes else []
    if missing:
        found.append(f"{missing} required listener(s) with no socket to bind")
    return "; ".join(found)


def ok(survey: Survey) -> bool:
    """Whether ``run`` would bind every required listener as far as can be told beforehand."""
    unresolved = any(u.listener.required for u in survey.expansion.unresolved)
    return not survey.clashes and not unresolved
