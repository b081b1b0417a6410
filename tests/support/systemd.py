"""
systemd's part, played by a test on a machine without a running systemd: the unit
files of `examples/` read as systemd reads them (`read_unit`), and a service started
the way socket activation starts it (`ACTIVATE`): its sockets bound and listening
before it runs, handed over as file descriptors 3, 4, ... with LISTEN_FDS, LISTEN_PID
(its own PID) and LISTEN_FDNAMES in its environment, which Twisted's `systemd:`
endpoint reads (`twisted.python.systemd.ListenFDs`).
"""

from __future__ import annotations

import ipaddress
import re
import shlex
import shutil

import attrs


@attrs.frozen
class Unit:
    """A unit file: for each section, its settings in file order. A setting may appear
    more than once (ListenStream=, ExecStartPre=...): each value is kept, in order."""

    sections: dict[str, list[tuple[str, str]]]

    def values(self, section: str, key: str) -> list[str]:
        """Every value of `key` in `section` (an empty value resets the list, as in systemd)."""
        found: list[str] = []
        for name, value in self.sections.get(section, []):
            if name == key:
                found = [] if value == "" else [*found, value]
        return found

    def value(self, section: str, key: str) -> str:
        """The one value of a setting that must be there."""
        found = self.values(section, key)
        if len(found) != 1:
            raise AssertionError(f"[{section}] {key}= should be set once, found {found}")
        return found[0]


def read_unit(text: str) -> Unit:
    """Parse a unit file with systemd's syntax: [Section] headers, Key=Value lines,
    comments from # or ; at the start of a line, a trailing backslash continuing a line."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.append((key.strip(), value.strip()))
        else:
            raise ValueError(f"not a unit file line: {raw!r}")
    return Unit(sections)


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|sec|seconds?|m|min|minutes?|h|hours?|)")
_SPAN_UNITS = {"ms": 0.001, "": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1}
_SPAN_UNITS |= {"m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600}


def timespan(text: str) -> float:
    """A systemd time span in seconds ("45s", "1min 30s", "90": seconds)."""
    parts = _SPAN.findall(text)
    if not parts or _SPAN.sub("", text).strip():
        raise ValueError(f"not a time span: {text!r}")
    return sum(float(number) * _SPAN_UNITS[unit] for number, unit in parts)


def exec_command(line: str, **replace: str) -> list[str]:
    """An Exec*= command line as a list of arguments: systemd's prefixes (-, @, +, !)
    are not used by our units (an error here), and $NAME is replaced by `replace[NAME]`
    (systemd's own: $MAINPID) or is an error."""
    if line[:1] in "-@+!:":
        raise ValueError(f"prefix {line[0]!r} is not handled here: {line!r}")
    args = shlex.split(line)
    result = []
    for arg in args:
        for name in re.findall(r"\$\{?([A-Z_]+)\}?", arg):
            if name not in replace:
                raise ValueError(f"${name} in {line!r} is not known here")
            arg = re.sub(rf"\$\{{?{name}\}}?", replace[name], arg)
        result.append(arg)
    return result


def loopback_stream(listen: str) -> str:
    """A ListenStream= value moved to loopback and a free port, keeping its address family
    (systemd: a port alone is an IPv6 socket that takes IPv4 too; an IPv4 address is an
    IPv4 socket): "HOST:PORT" or "[HOST]:PORT" for `ACTIVATE`."""
    if re.fullmatch(r"\d+", listen):
        return "[::1]:0"
    match = re.fullmatch(r"\[(?P<v6>[^\]]+)\]:\d+|(?P<v4>[\d.]+):\d+", listen)
    if match is None:
        raise ValueError(f"not a TCP ListenStream= this test handles: {listen!r}")
    if match["v6"] is not None:
        ipaddress.IPv6Address(match["v6"])
        return "[::1]:0"
    ipaddress.IPv4Address(match["v4"])
    return "127.0.0.1:0"


ACTIVATE = r"""
import fcntl, os, socket, sys
# argv: backlog, fd names (colon-separated, as LISTEN_FDNAMES), then addresses
# "HOST:PORT" or "[HOST]:PORT", "--", the command. Bind and listen on each, as systemd does for a socket unit, make
# them descriptors 3, 4, ... and exec the command with LISTEN_PID naming its own process.
backlog, names = int(sys.argv[1]), sys.argv[2]
separator = sys.argv.index("--")
addresses, command = sys.argv[3:separator], sys.argv[separator + 1:]
listening = []
for address in addresses:
    host, port = address.rsplit(":", 1)
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), int(port)))
    sock.listen(backlog)
    listening.append(sock)
    bound = sock.getsockname()
    print(f"systemd socket {len(listening) - 1} on {bound[0]}:{bound[1]}", flush=True)
# Out of the way first, so that moving one to 3 + index never overwrites another.
high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) for sock in listening]
for sock in listening:
    sock.close()
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index, inheritable=True)
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(listening)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=names)
os.execv(command[0], command)
"""
"""Play systemd starting a socket-activated service (see the module's docstring)."""

SOCKET_LINE = r"systemd socket {index} on [\d.:a-f]+:(\d+)"
"""What ACTIVATE prints for each socket (format with the index; group 1: its port)."""


def systemd_analyze() -> str | None:
    """The systemd-analyze command, when installed (it checks unit files without a running systemd)."""
    return shutil.which("systemd-analyze")
