"""The clash check: every bind the kernel would refuse, found before binding and explained.

Pure: bindings (in bind order) and the sockets other processes already hold go in; ``Clash``
values with plain-words explanations come out. The rule itself lives in ``bindrule.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from udpbindd.bindrule import (
    DEFAULT_HASH_ENTRIES,
    Kind,
    PortTable,
    Sock,
    quiet_slots,
    validate_name,
)
from udpbindd.expand import Binding
from udpbindd.host import HeldSocket
from udpbindd.names import SocketName, address_text, label, v4_value


class Overlap(enum.Enum):
    """Why two socket names on one port meet."""

    SAME = "same socket name"
    SAME_ADDRESS = "same address"
    NEW_COVERS = "the new socket's wildcard covers the other's address"
    OLD_COVERS = "the other socket's wildcard covers the new one's address"
    NEW_DUAL = "the new dual-stack [::] also covers IPv4"
    OLD_DUAL = "the other dual-stack [::] also covers IPv4"
    BOTH_ANY = "two [::] sockets always clash, whatever V6ONLY is"


@dataclass(frozen=True, slots=True)
class Clash:
    """``binding`` would fail with EADDRINUSE because of ``other``.

    ``certain`` is False when the verdict rests on what /proc cannot show about another
    process's socket (SO_REUSEPORT, and without sock_diag its device or V6ONLY); udpbindd then
    assumes the clash.
    """

    binding: Binding
    other: Binding | HeldSocket
    overlap: Overlap
    certain: bool = True

    @property
    def other_name(self) -> SocketName:
        return self.other.name

    @property
    def other_label(self) -> str:
        return _who(self.other)

    @property
    def headline(self) -> str:
        return f"{_who(self.binding)} clashes with {_who(self.other)}"

    @property
    def why(self) -> str:
        return _why(self)

    @property
    def fix(self) -> str:
        return _fix(self)

    def __str__(self) -> str:
        return f"{self.headline}: {self.why}. Fix: {self.fix}"


def _who(party: Binding | HeldSocket) -> str:
    if isinstance(party, Binding):
        return f"listener {party.listener.name!r} ({label(party.name)})"
    owner = party.owner
    holder = (
        f"pid {owner.pid} ({owner.command})" if owner else f"an unknown process (uid {party.uid})"
    )
    return f"{label(party.name)} held by {holder}"


def overlap_of(new: SocketName, old: SocketName) -> Overlap:
    """Classify how two overlapping socket names meet, for the explanation."""
    if new == old:
        return Overlap.SAME
    new_sock, old_sock = Sock(new), Sock(old)
    new_kind, old_kind = new_sock.kind, old_sock.kind
    if new_kind is Kind.ANY and old_kind is Kind.ANY:
        return Overlap.BOTH_ANY
    if new_kind is old_kind and (
        new.address == old.address or v4_value(new.address) == v4_value(old.address)
    ):
        return Overlap.SAME_ADDRESS
    if new.dual_stack and old_kind is Kind.V4:
        return Overlap.NEW_DUAL
    if old.dual_stack and new_kind is Kind.V4:
        return Overlap.OLD_DUAL
    return Overlap.NEW_COVERS if new.is_wildcard else Overlap.OLD_COVERS


def _why(clash: Clash) -> str:
    new, old = clash.binding.name, clash.other_name
    port, new_ip, old_ip = new.port, address_text(new.address), address_text(old.address)
    match clash.overlap:
        case Overlap.SAME:
            text = f"both want exactly {label(new)}"
        case Overlap.SAME_ADDRESS:
            text = f"both bind the same address ({new_ip} and {old_ip}) on port {port}"
        case Overlap.NEW_COVERS:
            text = f"{label(new)} receives on every {_family_word(new)} address"
            text += f", including {old_ip}"
        case Overlap.OLD_COVERS:
            text = f"{label(old)} already receives on every {_family_word(old)} address"
            text += f", including {new_ip}"
        case Overlap.NEW_DUAL:
            text = f"{label(new)} is dual-stack (V6ONLY=0), so it also receives IPv4"
            text += f", including {old_ip}"
        case Overlap.OLD_DUAL:
            text = f"{label(old)} is dual-stack (V6ONLY=0), so it also receives IPv4"
            text += f", including {new_ip}"
        case Overlap.BOTH_ANY:
            text = f"two [::] sockets on port {port} always clash, whatever V6ONLY is"
    devices = _devices(new, old)
    return f"{text}; {devices}; {_reuse_port(clash)}"


def _family_word(name: SocketName) -> str:
    if Sock(name).kind is Kind.V4:
        return "IPv4"
    return "IPv6 and IPv4" if name.dual_stack else "IPv6"


def _devices(new: SocketName, old: SocketName) -> str:
    if new.device and new.device == old.device:
        return f"both are bound to device {new.device}"
    if not new.device and not old.device:
        return "neither is bound to a device"
    unbound = label(new) if not new.device else label(old)
    bound = old.device or new.device
    return f"{unbound} is bound to no device, so it covers every device including {bound}"


def _reuse_port(clash: Clash) -> str:
    own = clash.binding.listener.reuse_port
    other = clash.other
    if isinstance(other, Binding):
        both = other.listener.reuse_port
        if own and both:
            return "reuse_port is set on both"  # only reached for an exact duplicate
        return "reuse_port would let them share the port only if both set it"
    if not own:
        return "reuse_port is off here, so nothing lets them share the port"
    if not clash.certain:
        return (
            "sharing would need reuse_port on both and the same owner; /proc does not show "
            "whether the other process set SO_REUSEPORT, so udpbindd assumes it did not"
        )
    return f"reuse_port cannot help: the other socket belongs to uid {other.uid}"


def _fix(clash: Clash) -> str:
    other = clash.other
    if isinstance(other, HeldSocket):
        who = (
            f"stop pid {other.owner.pid} ({other.owner.command})"
            if other.owner
            else "stop the process holding it"
        )
        return f"{who}, or move listener {clash.binding.listener.name!r} to another port or address"
    match clash.overlap:
        case Overlap.SAME | Overlap.SAME_ADDRESS | Overlap.BOTH_ANY:
            return "give one of the two listeners another port or address"
        case Overlap.NEW_DUAL | Overlap.OLD_DUAL:
            return (
                'use interface "*" without family dual ([::] with V6ONLY=1 beside 0.0.0.0), '
                "or another port"
            )
        case _:
            return (
                "list the specific addresses instead of the wildcard, bind the two to "
                "different devices, or use another port"
            )


def _sock(binding: Binding, uid: int) -> Sock:
    # udpbindd never sets SO_REUSEADDR: on UDP it would switch the kernel's check off.
    return Sock(binding.name, reuse_addr=False, reuse_port=binding.listener.reuse_port, uid=uid)


def _held_sock(held: HeldSocket) -> Sock:
    # /proc and sock_diag do not show SO_REUSEADDR/SO_REUSEPORT: assume neither (the worst).
    return Sock(held.name, reuse_addr=False, reuse_port=False, uid=held.uid)


def _certain(binding: Binding, held: HeldSocket, uid: int) -> bool:
    """Whether the clash with a foreign socket holds whatever /proc could not show."""
    if binding.listener.reuse_port and held.uid == uid:
        return False  # the other socket may have SO_REUSEPORT set
    if held.exact:
        return True
    # Without sock_diag the device and V6ONLY of the other socket are unknown.
    return not binding.name.device and not (
        held.name.address.version == 6 and held.name.is_wildcard and binding.name.family == 4
    )


def check(
    bindings: Sequence[Binding],
    held: Iterable[HeldSocket] = (),
    *,
    uid: int = 0,
    hash_entries: int = DEFAULT_HASH_ENTRIES,
) -> list[Clash]:
    """Every clash binding ``bindings`` in order would meet, with the host's ``held`` sockets.

    A binding that clashes is not bound, as at run time, so it cannot cause further clashes.
    Two bindings with the same socket name are always reported, even where SO_REUSEPORT would
    let the kernel accept them: udpbindd serves each socket name once.

    Hash slots where nothing can clash (``bindrule.quiet_slots``: typically thousands of
    addresses on one port, or thousands of ports) are only validated, never modelled.
    """
    table = PortTable(hash_entries)
    foreign = list(held)
    quiet = quiet_slots([*(s.name for s in foreign), *(b.name for b in bindings)], hash_entries)
    mask = hash_entries - 1  # PortTable checked that it is a power of two
    origin: dict[int, Binding | HeldSocket] = {}
    # Older sockets come first in the kernel's chains; inode numbers grow with age.
    for socket in sorted(foreign, key=lambda h: h.inode):
        if socket.name.port & mask in quiet:
            continue
        sock = _held_sock(socket)
        table.insert(sock)
        origin[id(sock)] = socket
    clashes: list[Clash] = []
    seen: dict[SocketName, Binding] = {}
    for binding in bindings:
        if binding.name.port & mask in quiet:
            validate_name(binding.name)
            continue
        duplicate = seen.get(binding.name)
        if duplicate is not None:
            clashes.append(Clash(binding, duplicate, Overlap.SAME))
            continue
        sock = _sock(binding, uid)
        refused_by = table.bind(sock)
        if refused_by is None:
            origin[id(sock)] = binding
            seen[binding.name] = binding
            continue
        other = origin[id(refused_by)]
        certain = True if isinstance(other, Binding) else _certain(binding, other, uid)
        clashes.append(Clash(binding, other, overlap_of(binding.name, other.name), certain))
    return clashes
