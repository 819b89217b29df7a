"""Who udpbindd runs as: the checks made before binding, and the switch to another user after.

Owns reading the process's capabilities from /proc, the refusal to start when a privileged
port cannot be bound, and ``switch``: setgroups, setgid and setuid, then proof that no
privilege was kept. Knows nothing of YAML, sockets or the loop; the CLI calls it.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from udpbindd.expand import Binding

# Capability numbers from linux/capability.h.
CAP_SETGID = 6
CAP_SETUID = 7
CAP_NET_BIND_SERVICE = 10

STATUS = Path("/proc/self/status")
TASKS = Path("/proc/self/task")
UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
# The kernel's default when the sysctl cannot be read (it exists since Linux 4.11).
DEFAULT_UNPRIVILEGED_PORT_START = 1024
_CAPABILITY_SETS = ("CapPrm", "CapEff", "CapAmb")


class PrivilegeError(Exception):
    """A user switch, or a privileged port, that cannot be had; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Account:
    """The user udpbindd switches to, with the groups that user belongs to."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def parse_status(text: str) -> dict[str, str]:
    """The ``Key: value`` fields of a /proc/PID/status text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def capability_set(status: dict[str, str], name: str = "CapEff") -> int:
    """One capability set (``CapEff``, ``CapPrm``, ...) of a parsed status, as a bit mask."""
    try:
        return int(status[name], 16)
    except (KeyError, ValueError):
        return 0


def effective_capabilities() -> int:
    """This process's effective capabilities (0 when /proc cannot tell)."""
    try:
        return capability_set(parse_status(STATUS.read_text()))
    except OSError:
        return 0


def unprivileged_port_start() -> int:
    """The lowest port anyone may bind (net.ipv4.ip_unprivileged_port_start)."""
    try:
        return int(UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        return DEFAULT_UNPRIVILEGED_PORT_START


def _has(capabilities: int, capability: int) -> bool:
    return bool(capabilities >> capability & 1)


def privileged_port_problem(
    bindings: Iterable[Binding], *, capabilities: int, port_start: int
) -> str:
    """Why ``bindings`` cannot all be bound by a process with ``capabilities``; "" if they can.

    A port below ``port_start`` needs CAP_NET_BIND_SERVICE (root has it). The message names
    every listener concerned, and the three ways out.
    """
    if _has(capabilities, CAP_NET_BIND_SERVICE):
        return ""
    low = [binding for binding in bindings if binding.name.port < port_start]
    if not low:
        return ""
    named = ", ".join(f"{b.listener.name!r} ({b.name})" for b in low)
    which = "listener" if len(low) == 1 else "listeners"
    return (
        f"{which} {named}: ports below {port_start} need CAP_NET_BIND_SERVICE, which this "
        "process lacks: run as root with --user NAME, grant CAP_NET_BIND_SERVICE, "
        "or pass the sockets by socket activation (udpbindd.socket)"
    )


def resolve(name: str) -> Account:
    """The account called ``name``, checked before anything is bound.

    Raises:
        PrivilegeError: no such user, the user is root, or this process cannot switch to it.
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"user {name!r} does not exist on this host") from None
    if entry.pw_uid == 0:
        raise PrivilegeError(f"user {name!r} is uid 0, which keeps every privilege")
    account = Account(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))
    if _is_already(account):
        return account
    capabilities = effective_capabilities()
    if not (_has(capabilities, CAP_SETUID) and _has(capabilities, CAP_SETGID)):
        raise PrivilegeError(
            f"switching to user {name!r} needs root (CAP_SETUID and CAP_SETGID); "
            f"udpbindd runs as uid {os.geteuid()}: start it as root, or without --user/user:"
        )
    return account


def _is_already(account: Account) -> bool:
    return os.getresuid() == (account.uid,) * 3 and os.getresgid() == (account.gid,) * 3


def switch(account: Account) -> None:
    """Become ``account`` for good: its groups, its gid, its uid, and no capability.

    From root without keep-caps, setuid to another uid empties the permitted, effective and
    ambient capability sets; glibc applies each call to every thread of the process (the
    metrics server's too). The result is read back from /proc for every thread, not assumed.

    Raises:
        PrivilegeError: the switch failed, or left some privilege behind.
    """
    if _is_already(account):
        return
    try:
        # Groups first and uid last: each step needs the privilege the next one gives up.
        os.setgroups(list(account.groups))
        os.setresgid(account.gid, account.gid, account.gid)
        os.setresuid(account.uid, account.uid, account.uid)
    except OSError as error:
        raise PrivilegeError(f"cannot switch to user {account.name!r}: {error}") from None
    left = kept_privileges(account)
    if left:
        raise PrivilegeError(f"switched to user {account.name!r} but kept {left}")


def kept_privileges(account: Account) -> str:
    """What this process still has beyond ``account`` ("" when nothing), by thread."""
    try:
        tasks = sorted(TASKS.iterdir())
    except OSError as error:
        return f"an unreadable thread list ({error})"
    want_uid = " ".join([str(account.uid)] * 4)  # real, effective, saved, filesystem
    want_gid = " ".join([str(account.gid)] * 4)
    for task in tasks:
        try:
            status = parse_status((task / "status").read_text())
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        except OSError as error:
            return f"an unreadable thread status ({error})"
        if status.get("Uid", "").split() != want_uid.split():
            return f"uids {status.get('Uid')} in thread {task.name}"
        if status.get("Gid", "").split() != want_gid.split():
            return f"gids {status.get('Gid')} in thread {task.name}"
        groups = {int(g) for g in status.get("Groups", "").split()}
        if groups != set(account.groups):
            return f"groups {sorted(groups)} in thread {task.name}"
        for name in _CAPABILITY_SETS:
            if capability_set(status, name):
                return f"capabilities ({name} {status[name]}) in thread {task.name}"
    return ""
