"""The configuration: YAML text → a validated, immutable ``Config``; every problem at once.

Pure except ``load``/``load_default``, which read a file. ``load`` keeps what it read last, so
that a reload of a file with thousands of listeners reads again only the entries that
changed. Never touches sockets, logging or metrics. Problems read ``FILE:LINE: path:
message`` and the CLI turns them into exit 78. Also owns the defaults of the source policy
(access lists, rate limit, reflection guard) that ``guard.py`` enforces.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import difflib
import enum
import functools
import ipaddress
import math
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast

from udpbindd.gcpause import collection_paused
from udpbindd.names import IPV6_ANY, IPAddress, address_text
from udpbindd.reread import Rereader
from udpbindd.yamlsrc import (
    INVALID,
    Document,
    Item,
    Problem,
    Stream,
    read,
)

DEFAULT_PATH = Path("/etc/udpbindd/udpbindd.yaml")
EMBEDDED_NAME = "<embedded default>"
DEFAULT_RECV_BUFFER = 4 * 1024 * 1024
MAX_RECV_BUFFER = 1024 * 1024 * 1024
# How long a required listener whose address or interface is absent may hold start-up back.
# 90 s is systemd's default TimeoutStartSec: long enough for DHCP or a VPN to come up.
DEFAULT_BIND_TIMEOUT = 90.0
MAX_BIND_TIMEOUT = 86400.0
MAX_FILE_BYTES = 16 * 1024 * 1024
# Linux interface names: at most IFNAMSIZ-1 bytes, no '/', ':' or whitespace (dev_valid_name).
_IFNAME = re.compile(r"^(?!\.{1,2}$)[^/:\s%]{1,15}$")
# Text an operator meant as an address: digits and dots ("10.0.0.300"), or hex digits and dots
# around a colon ("fe80::1::2"). Such text is never taken for an interface name.
_LOOKS_LIKE_ADDRESS = re.compile(r"^[\d.]*\.[\d.]*$|^[\da-fA-F.:]*:[\da-fA-F.:]*$")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}\Z")
_METRICS_LISTEN = re.compile(r"^(?:\[(?P<v6>[^\]]*)\]|(?P<v4>[^:\[\]]*)):(?P<port>\d{1,5})$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
# User names as shadow's useradd accepts them: no leading '-', at most 32 characters, an
# optional trailing '$' (machine accounts). All-digit names are refused: they read as uids.
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}$|^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,30}\$$")
USER_NAME_MAX = 32

# Source policy (see docs/security.md for why each value is what it is).
MAX_RATE = 1_000_000  # packets a second; one Python loop serves far fewer
MAX_BURST = 1_000_000
DEFAULT_IPV6_PREFIX = 64  # one IPv6 subscriber or LAN usually holds a whole /64
DEFAULT_MAX_SOURCES = 65536  # about 11 MB of tracked sources (about 170 bytes each)
MAX_SOURCES_LIMIT = 1 << 22  # about 700 MB: beyond this, limit in the firewall instead
DEFAULT_MAX_AMPLIFICATION = 2.0
MAX_AMPLIFICATION = 100.0
# Source ports no client sends from. A datagram "from" one of them is either spoofed to bounce
# our reply at that service (which may answer back: a loop) or aimed at an amplifier's victim.
# Source port 0 is refused as well, always: it is not a port anything can receive on.
REFLECTION_PORTS: dict[int, str] = {
    7: "echo",
    9: "discard",
    13: "daytime",
    17: "qotd",
    19: "chargen",
    37: "time",
    53: "dns",
    69: "tftp",
    111: "sunrpc",
    123: "ntp",
    137: "netbios-ns",
    161: "snmp",
    389: "cldap",
    520: "rip",
    1900: "ssdp",
    3702: "ws-discovery",
    5353: "mdns",
    11211: "memcached",
}
DEFAULT_REFLECTION_PORTS = tuple(sorted(REFLECTION_PORTS))


class Family(enum.StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    DUAL = "dual"


class Responder(enum.StrEnum):
    SIZE = "size"  # replies "Your data was N bytes"
    ECHO = "echo"  # returns the datagram unchanged
    DISCARD = "discard"  # replies nothing


class LogFormat(enum.StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class IOMode(enum.StrEnum):
    """How the loop moves datagrams: ``batched`` (recvmmsg/sendmmsg where the kernel and libc
    have them, else plain) or ``plain`` (one recvfrom/sendto per datagram)."""

    BATCHED = "batched"
    PLAIN = "plain"


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Wildcard:
    """``"*"``: every address of the listener's families."""


@dataclass(frozen=True, slots=True)
class Literal:
    """One address literal; ``zone`` is the interface of a link-local IPv6 address."""

    address: IPAddress
    zone: str = ""


@dataclass(frozen=True, slots=True)
class InterfaceName:
    """An interface name: the listener follows that interface's addresses."""

    name: str


Target = Wildcard | Literal | InterfaceName
WILDCARD = Wildcard()
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket per source: ``burst`` datagrams at once, refilled at the given rate.

    IPv4 sources are limited one address each, IPv6 sources one ``ipv6_prefix`` network
    each; at most ``max_sources`` are tracked (the least recently seen are forgotten).
    """

    packets_per_second: float
    burst: int
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX
    max_sources: int = DEFAULT_MAX_SOURCES


@dataclass(frozen=True, slots=True)
class ReflectionPolicy:
    """No reply to source ports in ``ports`` (and 0), to sources that cannot be a client
    (unspecified, multicast, broadcast), or larger than ``max_amplification`` times the request.
    """

    enabled: bool = True
    ports: tuple[int, ...] = DEFAULT_REFLECTION_PORTS
    max_amplification: float = DEFAULT_MAX_AMPLIFICATION


# Every listener without a reflection_guard section shares this one.
DEFAULT_REFLECTION = ReflectionPolicy()


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    """What a listener asks of its sockets besides their names: most files give thousands of
    listeners the same, so equal settings are one shared object (see ``Listener``)."""

    family: Family | None = None
    responder: Responder = Responder.SIZE
    drop_rate: float = 0.0
    device: str = ""
    reuse_port: bool = False
    freebind: bool = False
    recv_buffer: int = DEFAULT_RECV_BUFFER
    required: bool = True
    enabled: bool = True
    bind_timeout: float = DEFAULT_BIND_TIMEOUT
    # Source policy; v4-mapped networks are stored as IPv4 ones (sources are normalised too).
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    rate_limit: RateLimit | None = None
    reflection_guard: ReflectionPolicy = DEFAULT_REFLECTION


DEFAULT_SETTINGS = ListenerSettings()
_SETTING_NAMES = tuple(each.name for each in dataclasses.fields(ListenerSettings))


class _Unset(enum.Enum):
    """A listener setting not given to ``Listener``: its ``settings`` decide it."""

    UNSET = "unset"


_UNSET = _Unset.UNSET


@dataclass(frozen=True, slots=True, init=False)
class Listener:
    """One listener as configured. Expands to one or more socket names (see ``expand.py``).

    Its own are the name, the address or interface asked for, the port and the line; the rest
    is its ``settings``, shared with every listener that has the same, and read through the
    properties below as if it were the listener's own: with 10,000 listeners a listener is
    80 B rather than 184. Built as before, from every setting by keyword, or from ``settings``.
    """

    name: str
    interface: str
    target: Target
    port: int
    settings: ListenerSettings
    line: int

    def __init__(
        self,
        name: str,
        interface: str,
        target: Target,
        port: int,
        *,
        family: Family | _Unset | None = _UNSET,
        responder: Responder | _Unset = _UNSET,
        drop_rate: float | _Unset = _UNSET,
        device: str | _Unset = _UNSET,
        reuse_port: bool | _Unset = _UNSET,
        freebind: bool | _Unset = _UNSET,
        recv_buffer: int | _Unset = _UNSET,
        required: bool | _Unset = _UNSET,
        enabled: bool | _Unset = _UNSET,
        bind_timeout: float | _Unset = _UNSET,
        allow: tuple[Network, ...] | _Unset = _UNSET,
        deny: tuple[Network, ...] | _Unset = _UNSET,
        rate_limit: RateLimit | _Unset | None = _UNSET,
        reflection_guard: ReflectionPolicy | _Unset = _UNSET,
        line: int = 0,
        settings: ListenerSettings = DEFAULT_SETTINGS,
    ) -> None:
        # A setting given by keyword changes ``settings`` (the defaults when none is given),
        # so that dataclasses.replace(listener, reuse_port=True) means what it says.
        given = (
            family,
            responder,
            drop_rate,
            device,
            reuse_port,
            freebind,
            recv_buffer,
            required,
            enabled,
            bind_timeout,
            allow,
            deny,
            rate_limit,
            reflection_guard,
        )
        changes: dict[str, Any] = {
            key: value
            for key, value in zip(_SETTING_NAMES, given, strict=True)
            if value is not _UNSET
        }
        if changes:
            settings = dataclasses.replace(settings, **changes)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "interface", interface)
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "port", port)
        object.__setattr__(self, "settings", settings)
        object.__setattr__(self, "line", line)

    @property
    def family(self) -> Family | None:
        return self.settings.family

    @property
    def responder(self) -> Responder:
        return self.settings.responder

    @property
    def drop_rate(self) -> float:
        return self.settings.drop_rate

    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def reuse_port(self) -> bool:
        return self.settings.reuse_port

    @property
    def freebind(self) -> bool:
        return self.settings.freebind

    @property
    def recv_buffer(self) -> int:
        return self.settings.recv_buffer

    @property
    def required(self) -> bool:
        return self.settings.required

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @property
    def bind_timeout(self) -> float:
        return self.settings.bind_timeout

    @property
    def allow(self) -> tuple[Network, ...]:
        return self.settings.allow

    @property
    def deny(self) -> tuple[Network, ...]:
        return self.settings.deny

    @property
    def rate_limit(self) -> RateLimit | None:
        return self.settings.rate_limit

    @property
    def reflection_guard(self) -> ReflectionPolicy:
        return self.settings.reflection_guard


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An HTTP listen address for the metrics endpoint."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MetricsTLS:
    """HTTPS for the metrics endpoint: PEM files by absolute path, read when serving starts.

    ``client_ca``, when set, is the CA whose client certificates are required.
    """

    cert: str
    key: str
    client_ca: str = ""


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: tuple[Endpoint, ...] = ()
    tls: MetricsTLS | None = None


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = LogLevel.INFO
    format: LogFormat = LogFormat.AUTO


@dataclass(frozen=True, slots=True)
class Config:
    """A whole, valid configuration."""

    source: str
    listeners: tuple[Listener, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    user: str = ""  # switch to this user after binding; "" stays who we are
    io: IOMode = IOMode.BATCHED

    @property
    def enabled_listeners(self) -> tuple[Listener, ...]:
        return tuple(listener for listener in self.listeners if listener.enabled)


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every reason, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        # Stable: problems on one line keep the order they were found in (left to right).
        self.problems = tuple(sorted(problems, key=lambda problem: problem.line))
        super().__init__("\n".join(str(problem) for problem in self.problems))


# ---------------------------------------------------------------------------------------------
# Reading


def load(path: Path) -> Config:
    """Read and validate a configuration file.

    Raises:
        ConfigError: the file is missing, unreadable, not text, or invalid.
    """
    source = str(path)
    try:
        if path.is_dir():
            raise ConfigError([Problem(source, 0, "", "is a directory, not a file")])
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([Problem(source, 0, "", "no such file")]) from None
    except PermissionError:
        raise ConfigError([Problem(source, 0, "", "permission denied")]) from None
    except OSError as error:
        raise ConfigError([Problem(source, 0, "", f"cannot read: {error.strerror}")]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError([Problem(source, 0, "", f"larger than {MAX_FILE_BYTES} bytes")])
    text = _decode(data, source)
    with collection_paused():
        return REREADER.load(text, source)


def load_default() -> Config:
    """The embedded default: one ``size`` listener on 127.0.0.1:1060, metrics on :9917."""
    text = resources.files("udpbindd").joinpath("default.yaml").read_bytes()
    return parse_bytes(text, EMBEDDED_NAME)


def parse_bytes(data: bytes, source: str) -> Config:
    """Validate configuration bytes; ``source`` names them in problems."""
    return parse_text(_decode(data, source), source)


def _decode(data: bytes, source: str) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError([Problem(source, 0, "", "UTF-16 text: save the file as UTF-8")])
    if b"\x00" in data:
        raise ConfigError([Problem(source, 0, "", "binary data, not a YAML text file")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError([Problem(source, line, "", "not valid UTF-8 text")]) from None
    return text


def parse_text(text: str, source: str) -> Config:
    """Validate configuration text; ``source`` names it in problems.

    Raises:
        ConfigError: with every problem found, each with its line.
    """
    with collection_paused():
        return _parse_text(text, source)


def _parse_text(text: str, source: str) -> Config:
    return _read(text, source)[1]


def _read(text: str, source: str) -> tuple[Document, Config]:
    """Read and check the whole text; each listener is checked as soon as it is read."""
    checker = _Checker(source, [])
    document = read(text, source, Stream("listeners", checker.take))
    root, problems = document.root, document.problems
    if root is None and not problems:
        raise ConfigError(
            [Problem(source, 0, "", "empty file: expected a mapping with 'listeners'")]
        )
    if root is None:
        raise ConfigError(problems)
    checker.problems = problems  # the YAML layer's come first, as they are found first
    config = checker.config(root)
    if checker.problems or config is None:
        raise ConfigError(checker.problems)
    return document, config


def _read_listener(source: str, item: Item, path: str) -> Listener | None:
    """One listener entry read on its own; ``None`` if it has any problem."""
    checker = _Checker(source, [])
    listener = checker.listener(item, path)
    return None if checker.problems else listener


# What ``load`` read last, so that a reload of the same file reads only what changed in it.
REREADER = Rereader(_read, _read_listener)


# ---------------------------------------------------------------------------------------------
# Validation

_T = TypeVar("_T")
_E = TypeVar("_E", bound=enum.StrEnum)
_R = TypeVar("_R")

TOP_KEYS = frozenset({"listeners", "metrics", "logging", "user", "io"})
LISTENER_KEYS = frozenset(
    {
        "name", "interface", "port", "family", "responder", "drop_rate", "device",
        "reuse_port", "freebind", "recv_buffer", "required", "enabled", "bind_timeout",
        "allow", "deny", "rate_limit", "reflection_guard",
    }
)  # fmt: skip
RATE_LIMIT_KEYS = frozenset({"packets_per_second", "burst", "ipv6_prefix", "max_sources"})
REFLECTION_KEYS = frozenset({"enabled", "ports", "max_amplification"})
METRICS_KEYS = frozenset({"listen", "tls"})
TLS_KEYS = frozenset({"cert", "key", "client_ca"})
LOGGING_KEYS = frozenset({"level", "format"})


def _type_name(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, datetime.date):
        return f"a date ({value.isoformat()})"
    return f"{type(value).__name__} ({value!r})"


def _text(item: Item | None) -> str | None:
    return item.value if item is not None and isinstance(item.value, str) else None


@functools.cache
def _options(kind: type[enum.StrEnum]) -> str:
    return ", ".join(member.value for member in kind)


def _unknown_key(key: str, allowed: frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return f"unknown key (known: {', '.join(sorted(allowed))})"


class _Checked(Item):
    """A listener entry checked while the file was read: what was found, in its place.

    An ``Item`` itself (its value is None: the tree was dropped), so that each of 10,000
    entries leaves one object until the list is done, not an item and its contents. Its
    size (88 B) matters too: a size no lasting object of the read shares (a ``Listener`` is
    80 B), so the memory these leave when the list is done is taken up again whole (socket
    objects are 88 B) rather than left as holes between listeners.
    """

    __slots__ = ("given", "listener", "name", "problems")

    def __init__(
        self,
        entry: Item,
        listener: Listener | None,
        problems: tuple[Problem, ...],
        given: Item | None,
    ) -> None:
        super().__init__(None, entry.line, entry.key_line)
        self.listener = listener
        self.problems = problems
        self.given = given  # the entry's name, whether or not it is valid
        # The name the entry claims: its listener's, else the one given (checked even when
        # the rest of the listener is not).
        self.name = listener.name if listener else _text(given)


def _given_name(entry: Item) -> Item | None:
    return entry.value.get("name") if isinstance(entry.value, dict) else None


class _Checker:
    """Walks the YAML tree, building the model and collecting every problem."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        self.remembered_values: dict[tuple[str, str], Any] = {}
        # Each distinct set of listener settings once: listeners share equal ones.
        self.settings: dict[ListenerSettings, ListenerSettings] = {
            DEFAULT_SETTINGS: DEFAULT_SETTINGS
        }

    def problem(self, item: Item, path: str, message: str) -> None:
        if item.value is INVALID:
            return  # the YAML layer has already said why this value could not be read
        self.problems.append(Problem(self.source, item.where, path, message))

    # -- generic helpers -----------------------------------------------------------------------

    def mapping(self, item: Item, path: str, allowed: frozenset[str]) -> dict[str, Item] | None:
        if not isinstance(item.value, dict):
            self.problem(
                item, path or "(top level)", f"expected a mapping, got {_type_name(item.value)}"
            )
            return None
        if allowed.issuperset(item.value):
            return item.value
        for key, child in item.value.items():
            if key not in allowed:
                self.problem(child, f"{path}.{key}" if path else key, _unknown_key(key, allowed))
        return item.value

    def typed(self, item: Item, path: str, kind: type[_T], what: str) -> _T | None:
        value = item.value
        # bool is an int in Python, but "port: true" is a mistake, not port 1.
        if isinstance(value, kind) and not (kind is not bool and isinstance(value, bool)):
            return value
        self.problem(item, path, f"expected {what}, got {_type_name(value)}")
        return None

    def choice(self, item: Item, path: str, kind: type[_E]) -> _E | None:
        options = _options(kind)
        text = self.typed(item, path, str, f"one of: {options}")
        if text is None:
            return None
        try:
            return kind(text.strip().lower())
        except ValueError:
            self.problem(item, path, f"{text!r} is not one of: {options}")
            return None

    def optional(
        self, fields: dict[str, Item], key: str, path: str, build: Callable[[Item, str], _T | None]
    ) -> _T | None:
        item = fields.get(key)
        return None if item is None else build(item, f"{path}.{key}")

    # -- sections ------------------------------------------------------------------------------

    def config(self, root: Item) -> Config | None:
        fields = self.mapping(root, "", TOP_KEYS)
        if fields is None:
            return None
        listeners_item = fields.get("listeners")
        listeners: tuple[Listener, ...] = ()
        if listeners_item is None:
            self.problem(root, "listeners", "required: a list of listeners")
        else:
            listeners = self.listeners(listeners_item)
        # An empty section ("metrics:" with nothing under it) means the defaults, as if absent.
        metrics = MetricsConfig(DEFAULT_METRICS_LISTEN_ENDPOINTS)
        if fields.get("metrics", Item(None, 0)).value is not None:
            metrics = self.metrics(fields["metrics"]) or metrics
        logging = LoggingConfig()
        if fields.get("logging", Item(None, 0)).value is not None:
            logging = self.logging(fields["logging"]) or logging
        user = self.optional(fields, "user", "", lambda i, _: self.user(i))
        io = self.optional(fields, "io", "", lambda i, p: self.choice(i, "io", IOMode))
        return Config(self.source, listeners, metrics, logging, user or "", io or IOMode.BATCHED)

    def listeners(self, item: Item) -> tuple[Listener, ...]:
        if not isinstance(item.value, list):
            hint = " (write [] for none)" if item.value is None else ""
            self.problem(item, "listeners", f"expected a list, got {_type_name(item.value)}{hint}")
            return ()
        result: list[Listener] = []
        seen: dict[str, int] = {}
        for index, child in enumerate(item.value):
            path = f"listeners[{index}]"
            if isinstance(child, _Checked):
                listener, given, name = child.listener, child.given, child.name
                self.problems.extend(child.problems)
            else:
                listener = self.listener(child, path)
                given = _given_name(child)
                # A name given explicitly is checked even when the rest of its listener is not.
                name = listener.name if listener else _text(given)
            if name is None:
                continue
            if name in seen:
                self.duplicate_name(child, given, path, name, seen[name])
                continue
            seen[name] = index
            if listener is not None:
                result.append(listener)
        return tuple(result)

    def take(self, item: Item, index: int) -> Item:
        """Check one listener entry as soon as it is read (see ``Stream``), so that its tree
        is dropped at once; ``listeners`` reports what was found in its turn."""
        if not isinstance(item.value, dict):
            return item
        problems, self.problems = self.problems, []
        try:
            listener = self.listener(item, f"listeners[{index}]")
            found = tuple(self.problems) if self.problems else ()
        finally:
            self.problems = problems
        return _Checked(item, listener, found, _given_name(item))

    def duplicate_name(
        self, item: Item, given: Item | None, path: str, name: str, first: int
    ) -> None:
        if given is not None:
            self.problem(
                given, f"{path}.name", f"duplicate name {name!r} (also listeners[{first}])"
            )
        else:
            # Unnamed listeners are named after interface, port, device and family, so two
            # of them with one name would bind the very same socket.
            self.problem(
                item,
                path,
                f"same default name {name!r} as listeners[{first}]: "
                "both would bind the same socket",
            )

    def listener(self, item: Item, path: str) -> Listener | None:
        fields = self.mapping(item, path, LISTENER_KEYS)
        if fields is None:
            return None
        before = len(self.problems)
        port = interface = None
        target: Target | None = None
        if "port" not in fields:
            self.problem(item, f"{path}.port", "required: a port number 1..65535")
        else:
            port = self.port(fields["port"], f"{path}.port")
        if "interface" not in fields:
            self.problem(
                item, f"{path}.interface", 'required: an address, "*" or an interface name'
            )
        else:
            interface_item = fields["interface"]
            interface = self.typed(
                interface_item, f"{path}.interface", str, 'an address, "*" or an interface name'
            )
            if interface is not None:
                target = self.remembered(
                    "interface", interface_item, f"{path}.interface", self.target
                )
        # The other keys, each checked only when given, in the order their problems are told.
        given: dict[str, Any] = {
            key: check(self, fields[key], f"{path}.{key}")
            for key, check in _LISTENER_OPTIONS
            if key in fields
        }
        if port is None or interface is None or target is None or len(self.problems) > before:
            return None
        family: Family | None = given.get("family")
        device: str = given.get("device") or ""
        if not self.coherent(fields, path, target, family, device):
            return None
        bind_timeout = given.get("bind_timeout")
        settings = ListenerSettings(
            family=family,
            responder=given.get("responder") or Responder.SIZE,
            drop_rate=given.get("drop_rate") or 0.0,
            device=device,
            # A flag whose value the YAML layer could not read (None) keeps its default.
            reuse_port=given.get("reuse_port") is True,
            freebind=given.get("freebind") is True,
            recv_buffer=given.get("recv_buffer") or DEFAULT_RECV_BUFFER,
            required=given.get("required") is not False,
            enabled=given.get("enabled") is not False,
            bind_timeout=DEFAULT_BIND_TIMEOUT if bind_timeout is None else bind_timeout,
            allow=given.get("allow") or (),
            deny=given.get("deny") or (),
            rate_limit=given.get("rate_limit"),
            reflection_guard=given.get("reflection_guard") or DEFAULT_REFLECTION,
        )
        return Listener(
            name=given.get("name") or _default_name(interface, port, target, family, device),
            interface=interface,
            target=target,
            port=port,
            line=item.line,
            settings=self.settings.setdefault(settings, settings),
        )

    def remembered(self, key: str, item: Item, path: str, check: Callable[[Item, str], _R]) -> _R:
        """``check``, once per distinct text: a file repeats the same few values thousands of
        times, and equal results are then one shared object. Only results that raised no
        problem are remembered, so every problem is still reported where it is."""
        text = item.value
        if type(text) is not str:
            return check(item, path)
        found = self.remembered_values.get((key, text))
        if found is not None:
            return cast(_R, found)
        before = len(self.problems)
        result = check(item, path)
        if result is not None and len(self.problems) == before:
            self.remembered_values[key, text] = result
        return result

    # -- listener fields -----------------------------------------------------------------------

    def family(self, item: Item, path: str) -> Family | None:
        return self.remembered("family", item, path, lambda i, p: self.choice(i, p, Family))

    def responder(self, item: Item, path: str) -> Responder | None:
        return self.remembered("responder", item, path, lambda i, p: self.choice(i, p, Responder))

    def flag(self, item: Item, path: str) -> bool | None:
        return self.typed(item, path, bool, "true or false")

    def recv_buffer(self, item: Item, path: str) -> int | None:
        return self.remembered("recv_buffer", item, path, self.size)

    def allow(self, item: Item, path: str) -> tuple[Network, ...] | None:
        return self.networks(item, path, allow=True)

    def deny(self, item: Item, path: str) -> tuple[Network, ...] | None:
        return self.networks(item, path, allow=False)

    def port(self, item: Item, path: str) -> int | None:
        value = self.typed(item, path, int, "a port number 1..65535")
        if value is not None and not 1 <= value <= 65535:
            self.problem(item, path, f"{value} is not in 1..65535")
            return None
        return value

    def target(self, item: Item, path: str) -> Target | None:
        """The listener's ``interface``, whose value is known to be a string."""
        text = str(item.value).strip()
        if text == "*":
            return WILDCARD
        if text == "":
            self.problem(item, path, 'empty: give an address, "*" or an interface name')
            return None
        unbracketed = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        address_part, percent, zone = unbracketed.partition("%")
        try:
            address = _ip_address(address_part)
        except ValueError:
            if _IFNAME.match(text) and not _LOOKS_LIKE_ADDRESS.match(text):
                return InterfaceName(text)
            self.problem(item, path, _bad_address(text, address_part))
            return None
        if percent:
            if address.version != 6 or not address.is_link_local:
                self.problem(item, path, f"{text!r}: a %zone is only for IPv6 link-local addresses")
                return None
            if not _IFNAME.match(zone):
                what = f"{zone!r} is not an interface name" if zone else "no interface after %"
                self.problem(item, path, f"{text!r}: {what}")
                return None
        return Literal(address, zone)

    def drop_rate(self, item: Item, path: str) -> float | None:
        value = item.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(item, path, f"expected a number 0.0..1.0, got {_type_name(value)}")
            return None
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            self.problem(item, path, f"{value} is not in 0.0..1.0")
            return None
        return float(value)

    def device(self, item: Item, path: str) -> str | None:
        value = self.typed(item, path, str, "an interface name")
        if value is not None and not _IFNAME.match(value):
            self.problem(item, path, f"{value!r} is not an interface name")
            return None
        return value

    def seconds(self, item: Item, path: str) -> float | None:
        value = item.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(
                item,
                path,
                f"expected a number of seconds 0..{MAX_BIND_TIMEOUT:g}, got {_type_name(value)}",
            )
            return None
        if not (math.isfinite(value) and 0 <= value <= MAX_BIND_TIMEOUT):
            self.problem(item, path, f"{value} is not in 0..{MAX_BIND_TIMEOUT:g} seconds")
            return None
        return float(value)

    def size(self, item: Item, path: str) -> int | None:
        value = item.value
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str) and (match := _SIZE.match(value)):
            unit = (match.group(2) or "").lower()
            size = int(match.group(1)) * _SIZE_UNITS[unit[:1] if unit != "b" else "b"]
        else:
            self.problem(
                item, path, f"expected a size such as 4MiB or 262144, got {_type_name(value)}"
            )
            return None
        if not 1 <= size <= MAX_RECV_BUFFER:
            self.problem(item, path, f"{size} bytes is not in 1..{MAX_RECV_BUFFER} (1GiB)")
            return None
        return size

    def name(self, item: Item, path: str) -> str | None:
        value = self.typed(item, path, str, "a string")
        if value is None:
            return None
        # Only " " is both printable and whitespace, so most names pass the first test alone.
        clean = value.isprintable() and " " not in value
        if not value.strip() or (
            not clean and any(ch.isspace() or not ch.isprintable() for ch in value)
        ):
            self.problem(item, path, f"{value!r}: names must be non-empty with no spaces")
            return None
        return value

    # -- source policy -------------------------------------------------------------------------

    def networks(self, item: Item, path: str, *, allow: bool) -> tuple[Network, ...] | None:
        """``allow``/``deny``: a list of addresses and networks, or one as a plain string."""
        value = item.value
        if isinstance(value, str):
            entries, single = [item], True
        elif isinstance(value, list):
            entries, single = value, False
        else:
            self.problem(
                item,
                path,
                f"expected a list of addresses or networks, got {_type_name(value)}",
            )
            return None
        if not entries and allow:
            # Refusing everyone is what "allow nothing" means, and never what was meant.
            self.problem(
                item,
                path,
                "an empty allow list would refuse every source: "
                "list the sources to allow, or remove the key to allow all",
            )
            return None
        seen: dict[Network, int] = {}
        for index, entry in enumerate(entries):
            entry_path = path if single else f"{path}[{index}]"
            network = self.network(entry, entry_path)
            if network is None:
                continue
            if network in seen:
                first = f"{path}[{seen[network]}]"
                text = (_text(entry) or "").strip()
                # Perhaps spelled differently: ::ffff:10.0.0.0/104 is 10.0.0.0/8.
                message = (
                    f"{network} is listed twice (also {first})"
                    if text == str(network)
                    else f"{text!r} is {network}, already listed as {first}"
                )
                self.problem(entry, entry_path, message)
                continue
            seen[network] = index
        return tuple(seen)

    def network(self, item: Item, path: str) -> Network | None:
        text = self.typed(
            item, path, str, "an address or network such as 192.0.2.0/24 or 2001:db8::/32"
        )
        if text is None:
            return None
        text = text.strip()
        if "%" in text:
            # Sources are matched without their zone; a zone here would suggest otherwise.
            self.problem(item, path, f"{text!r}: an access list takes no %zone")
            return None
        kind: type[Network] = ipaddress.IPv6Network if ":" in text else ipaddress.IPv4Network
        try:
            network: Network = kind(text)
        except ValueError as error:
            try:
                loose = kind(text, strict=False)
            except ValueError:
                self.problem(item, path, f"{text!r} is not an address or network: {error}")
                return None
            one = _unmapped(kind(text.partition("/")[0]))
            self.problem(
                item,
                path,
                f"{text!r} has host bits set: write {_unmapped(loose)} for the network, "
                f"or {one} for one address",
            )
            return None
        return _unmapped(network)

    def rate_limit(self, item: Item, path: str) -> RateLimit | None:
        fields = self.mapping(item, path, RATE_LIMIT_KEYS)
        if fields is None:
            return None
        before = len(self.problems)
        rate: float | None = None
        burst: int | None = None
        if "packets_per_second" not in fields:
            self.problem(
                item,
                f"{path}.packets_per_second",
                "required: the packets a second one source may send, e.g. 10",
            )
        else:
            rate = self.rate(fields["packets_per_second"], f"{path}.packets_per_second")
        if "burst" not in fields:
            self.problem(
                item, f"{path}.burst", "required: the packets one source may send at once, e.g. 20"
            )
        else:
            burst = self.integer(fields["burst"], f"{path}.burst", 1, MAX_BURST)
        prefix = self.optional(fields, "ipv6_prefix", path, lambda i, p: self.integer(i, p, 1, 128))
        sources = self.optional(
            fields, "max_sources", path, lambda i, p: self.integer(i, p, 1, MAX_SOURCES_LIMIT)
        )
        if rate is None or burst is None or len(self.problems) > before:
            return None
        return RateLimit(
            rate,
            burst,
            DEFAULT_IPV6_PREFIX if prefix is None else prefix,
            DEFAULT_MAX_SOURCES if sources is None else sources,
        )

    def rate(self, item: Item, path: str) -> float | None:
        value = item.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(
                item, path, f"expected a number of packets a second, got {_type_name(value)}"
            )
            return None
        if not (math.isfinite(value) and 0 < value <= MAX_RATE):
            self.problem(item, path, f"{value} is not in 0..{MAX_RATE} (above 0)")
            return None
        return float(value)

    def integer(self, item: Item, path: str, low: int, high: int) -> int | None:
        value = self.typed(item, path, int, f"a whole number {low}..{high}")
        if value is not None and not low <= value <= high:
            self.problem(item, path, f"{value} is not in {low}..{high}")
            return None
        return value

    def reflection_guard(self, item: Item, path: str) -> ReflectionPolicy | None:
        if item.value is None:
            return ReflectionPolicy()  # an empty section means its defaults
        if isinstance(item.value, bool):
            self.problem(
                item,
                path,
                f"expected a mapping, got {_type_name(item.value)} "
                f"(write {{enabled: {str(item.value).lower()}}})",
            )
            return None
        fields = self.mapping(item, path, REFLECTION_KEYS)
        if fields is None:
            return None
        before = len(self.problems)
        enabled = self.optional(
            fields, "enabled", path, lambda i, p: self.typed(i, p, bool, "true or false")
        )
        ports = self.optional(fields, "ports", path, self.reflection_ports)
        factor = self.optional(fields, "max_amplification", path, self.amplification)
        if len(self.problems) > before:
            return None
        return ReflectionPolicy(
            True if enabled is None else enabled,
            DEFAULT_REFLECTION_PORTS if ports is None else ports,
            DEFAULT_MAX_AMPLIFICATION if factor is None else factor,
        )

    def reflection_ports(self, item: Item, path: str) -> tuple[int, ...] | None:
        if not isinstance(item.value, list):
            self.problem(
                item,
                path,
                f"expected a list of port numbers, got {_type_name(item.value)} "
                "(write [] for none but port 0)",
            )
            return None
        ports: dict[int, int] = {}
        for index, entry in enumerate(item.value):
            entry_path = f"{path}[{index}]"
            port = self.typed(entry, entry_path, int, "a port number 1..65535")
            if port is None:
                continue
            if port == 0:
                self.problem(
                    entry, entry_path, "0 is not in 1..65535 (source port 0 is always refused)"
                )
            elif not 1 <= port <= 65535:
                self.problem(entry, entry_path, f"{port} is not in 1..65535")
            elif port in ports:
                self.problem(
                    entry, entry_path, f"{port} is listed twice (also {path}[{ports[port]}])"
                )
            else:
                ports[port] = index
        return tuple(sorted(ports))

    def amplification(self, item: Item, path: str) -> float | None:
        value = item.value
        what = f"a number 1.0..{MAX_AMPLIFICATION}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(item, path, f"expected {what}, got {_type_name(value)}")
            return None
        if not (math.isfinite(value) and 1.0 <= value <= MAX_AMPLIFICATION):
            self.problem(item, path, f"{value} is not in 1.0..{MAX_AMPLIFICATION}")
            return None
        return float(value)

    def user(self, item: Item) -> str | None:
        """The top-level ``user``: syntax only; whether it exists is known only at run time."""
        value = self.typed(item, "user", str, "a user name")
        if value is None:
            return None
        if value.isdigit():
            self.problem(item, "user", f"{value!r} is all digits: give a user name, not a uid")
            return None
        if not _USER.match(value) or value in {".", ".."}:
            self.problem(
                item,
                "user",
                f"{value!r} is not a user name (letters, digits, '_', '.', '-'; "
                f"at most {USER_NAME_MAX} characters)",
            )
            return None
        return value

    def coherent(
        self,
        fields: dict[str, Item],
        path: str,
        target: Target,
        family: Family | None,
        device: str,
    ) -> bool:
        """Cross-field rules: family vs address, dual-stack only on the wildcard, zones."""
        key, message = "", ""
        if isinstance(target, Literal):
            address = target.address
            wildcard6 = address == IPV6_ANY
            if family is Family.IPV4 and address.version == 6:
                key, message = (
                    "family",
                    f"family ipv4 does not fit the IPv6 address {address_text(address)}",
                )
            elif family is Family.IPV6 and address.version == 4:
                key, message = (
                    "family",
                    f"family ipv6 does not fit the IPv4 address {address_text(address)}",
                )
            elif family is Family.DUAL and not wildcard6:
                key, message = "family", 'family dual is only for the wildcard ("*" or "::")'
            elif address.version == 6 and address.is_link_local and not (target.zone or device):
                key = "interface"
                message = f"link-local {address} needs a zone ({address}%eth0) or a device"
            elif target.zone and device and target.zone != device:
                key = "device"
                message = f"device {device!r} is not the zone %{target.zone} of the address"
        elif isinstance(target, InterfaceName) and family is Family.DUAL:
            key, message = "family", 'family dual is only for the wildcard ("*" or "::")'
        if message:
            self.problem(fields[key], f"{path}.{key}", message)
            return False
        return True

    # -- metrics and logging -------------------------------------------------------------------

    def metrics(self, item: Item) -> MetricsConfig | None:
        fields = self.mapping(item, "metrics", METRICS_KEYS)
        if fields is None:
            return None
        tls_item = fields.get("tls")
        tls = None
        if tls_item is not None and tls_item.value is not None:
            tls = self.tls(tls_item)
        listen = fields.get("listen")
        if listen is None or listen.value is None:
            return MetricsConfig(DEFAULT_METRICS_LISTEN_ENDPOINTS, tls)
        entries = listen.value if isinstance(listen.value, list) else [listen]
        endpoints: list[Endpoint] = []
        for index, entry in enumerate(entries):
            path = "metrics.listen" if entry is listen else f"metrics.listen[{index}]"
            endpoint = self.endpoint(entry, path)
            if endpoint is None:
                continue
            if endpoint in endpoints:
                self.problem(entry, path, f"{endpoint} is listed twice")
                continue
            endpoints.append(endpoint)
        return MetricsConfig(tuple(endpoints), tls)

    def tls(self, item: Item) -> MetricsTLS | None:
        fields = self.mapping(item, "metrics.tls", TLS_KEYS)
        if fields is None:
            return None
        paths: dict[str, str] = {}
        for key in ("cert", "key", "client_ca"):
            if key not in fields:
                if key != "client_ca":
                    self.problem(item, f"metrics.tls.{key}", "required: an absolute file path")
                continue
            path = self.typed(fields[key], f"metrics.tls.{key}", str, "an absolute file path")
            if path is None:
                continue
            # The daemon's working directory is / under systemd: a relative path misleads.
            if not path.startswith("/"):
                self.problem(fields[key], f"metrics.tls.{key}", f"{path!r} is not an absolute path")
                continue
            paths[key] = path
        if "cert" not in paths or "key" not in paths:
            return None
        return MetricsTLS(paths["cert"], paths["key"], paths.get("client_ca", ""))

    def endpoint(self, item: Item, path: str) -> Endpoint | None:
        text = self.typed(item, path, str, 'an address such as "127.0.0.1:9917" or "[::1]:9917"')
        if text is None:
            return None
        match = _METRICS_LISTEN.match(text.strip())
        if match is None:
            self.problem(item, path, f"{text!r} is not ADDRESS:PORT (IPv6 in brackets: [::1]:9917)")
            return None
        host = match.group("v6") if match.group("v6") is not None else match.group("v4")
        port = int(match.group("port"))
        try:
            if match.group("v6") is not None:
                ipaddress.IPv6Address(host)
            else:
                ipaddress.IPv4Address(host)
        except ValueError:
            kind = "an IPv6" if match.group("v6") is not None else "an IPv4"
            self.problem(item, path, f"{text!r}: {host!r} is not {kind} address")
            return None
        if not 1 <= port <= 65535:
            self.problem(item, path, f"{text!r}: port {port} is not in 1..65535")
            return None
        return Endpoint(host, port)

    def logging(self, item: Item) -> LoggingConfig | None:
        fields = self.mapping(item, "logging", LOGGING_KEYS)
        if fields is None:
            return None
        level = self.optional(fields, "level", "logging", lambda i, p: self.choice(i, p, LogLevel))
        fmt = self.optional(fields, "format", "logging", lambda i, p: self.choice(i, p, LogFormat))
        return LoggingConfig(level or LogLevel.INFO, fmt or LogFormat.AUTO)


DEFAULT_METRICS_LISTEN_ENDPOINTS = (Endpoint("127.0.0.1", 9917),)

# A listener's optional keys, in the order their problems are reported.
_LISTENER_OPTIONS: tuple[tuple[str, Callable[[_Checker, Item, str], object]], ...] = (
    ("family", _Checker.family),
    ("responder", _Checker.responder),
    ("drop_rate", _Checker.drop_rate),
    ("device", _Checker.device),
    ("reuse_port", _Checker.flag),
    ("freebind", _Checker.flag),
    ("required", _Checker.flag),
    ("enabled", _Checker.flag),
    ("recv_buffer", _Checker.recv_buffer),
    ("bind_timeout", _Checker.seconds),
    ("name", _Checker.name),
    ("allow", _Checker.allow),
    ("deny", _Checker.deny),
    ("rate_limit", _Checker.rate_limit),
    ("reflection_guard", _Checker.reflection_guard),
)


def _ip_address(text: str) -> IPAddress:
    """``ipaddress.ip_address``, several times faster for the dotted quads files list most.

    Raises:
        ValueError: ``text`` is not an address.
    """
    if _DOTTED_QUAD.match(text):
        # Exactly the dotted quads ipaddress accepts: no leading zeros, each 0..255.
        return ipaddress.IPv4Address(socket.inet_aton(text))
    return ipaddress.ip_address(text)


def _bad_address(text: str, address_part: str) -> str:
    """Why ``text``, which is neither an address nor an interface name, is rejected."""
    if _LOOKS_LIKE_ADDRESS.match(address_part):
        kind = ipaddress.IPv6Address if ":" in address_part else ipaddress.IPv4Address
        try:
            kind(address_part)
        except ValueError as error:
            return f"{text!r} is not a valid address: {error}"
    return f'{text!r} is not an IP address, "*" or an interface name'


def _unmapped(network: Network) -> Network:
    """A network inside ::ffff:0:0/96 as the IPv4 network it stands for; others unchanged.

    A dual-stack socket sees IPv4 clients as ::ffff:a.b.c.d; their sources are normalised to
    IPv4 before matching, so the lists are too.
    """
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _default_name(
    interface: str, port: int, target: Target, family: Family | None, device: str
) -> str:
    """A listener's default name: its socket name as written, e.g. ``127.0.0.1:1060``.

    The device and, where the address alone does not fix it, the family are added, so two
    unnamed listeners share a name only when they would bind the same socket: ``*:53%eth0``,
    ``*:53/ipv6``, ``lo:1060/ipv4``, ``[::]:53/dual``.
    """
    text = interface.strip()
    if ":" in text and not text.startswith("["):
        text = f"[{text}]"
    name = f"{text}:{port}"
    zoned = isinstance(target, Literal) and target.zone
    if device and not zoned:
        name += f"%{device}"
    specific = isinstance(target, Literal) and target.address != IPV6_ANY
    if family is not None and not specific:
        name += f"/{family.value}"
    return name
