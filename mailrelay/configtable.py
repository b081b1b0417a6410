"""
Reading one TOML table with exact error messages.

`Table` hands out typed values and records, instead of raising, every problem as
`file: key.path: reason`, so a configuration with five mistakes reports five lines.
Whatever a caller did not read is an unknown key when `finish()` is called.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple, TypeVar

T = TypeVar("T")

_MISSING: Any = object()
REQUIRED: Any = _MISSING
"""A `KeyRead.default` for a key read without a default (required, or read only when present)."""


class KeyRead(NamedTuple):
    """One key a `Table` was asked for, as a recorder (`recording()`) is told of it."""

    source: str
    concrete: str
    """Its key path with array indices: `listener[2].router.routes[0].host`."""
    kind: str
    """The Table method that read it: string, integer, seconds, number, boolean, strings, file, table, tables."""
    default: Any
    choices: tuple[str, ...] | None = None
    minimum: int | None = None
    maximum: int | None = None

    @property
    def path(self) -> str:
        """The key path without indices: `listener.router.routes.host`."""
        return re.sub(r"\[\d+\]", "", self.concrete)


_recorder: ContextVar[Callable[[KeyRead], None] | None] = ContextVar("mailrelay_config_recorder", default=None)


@contextmanager
def recording(recorder: Callable[[KeyRead], None]) -> Iterator[None]:
    """Tell `recorder` of every key any Table reads in this context (the configuration
    reference's test compares them with `mailrelay.schema`); without one, reads cost a
    context variable lookup."""
    token = _recorder.set(recorder)
    try:
        yield
    finally:
        _recorder.reset(token)


class ConfigError(Exception):
    """A configuration is invalid; `errors` holds one `file: key: reason` line each."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def read_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], os.stat_result]:
    """
    A TOML file's data and the status of the very file read; ConfigError (naming the
    file) when it is missing, unreadable, not UTF-8 or not TOML.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            status = os.fstat(f.fileno())
            text = f.read().decode("utf-8")
        return tomllib.loads(text), status
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: not UTF-8 text (byte {e.start})"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"]) from None


class Errors:
    """The error lines collected while reading one configuration source."""

    def __init__(self, source: str, top_level_keys: frozenset[str] = frozenset(), base_dir: str | None = None) -> None:
        self.source = source
        self.base_dir = base_dir
        """Relative file names in the configuration are relative to this folder (that of
        the configuration file); None: the current directory."""
        self.lines: list[str] = []
        self.top_level_keys = top_level_keys
        """Keys valid only at the top: found in a table, they were written after it."""
        self.systemd_sockets_later = False
        """`systemd:` endpoints are not checked for their socket now (`check` runs where
        systemd passes none, e.g. as ExecStartPre): the start will."""

    def add(self, path: str, reason: str) -> None:
        self.lines.append(f"{self.source}: {path}: {reason}" if path else f"{self.source}: {reason}")

    def raise_if_any(self) -> None:
        if self.lines:
            raise ConfigError(self.lines)


def _type_name(value: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


class Table:
    """One TOML table being read; `path` is its dotted key path for messages."""

    def __init__(self, data: dict[str, Any], path: str, errors: Errors) -> None:
        self.data = data
        self.path = path
        self.errors = errors
        self._read: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, reason: str) -> None:
        self.errors.add(self.key_path(key) if key else self.path, reason)

    def has(self, key: str) -> bool:
        return key in self.data

    def _note(self, key: str, kind: str, default: Any, choices: Any = None, minimum: Any = None, maximum: Any = None) -> None:
        recorder = _recorder.get()
        if recorder is not None:
            recorder(KeyRead(self.errors.source, self.key_path(key), kind, default, choices, minimum, maximum))

    def _get(self, key: str, default: Any, accept: tuple[type, ...], kind: str, secret: bool = False) -> Any:
        self._read.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.error(key, "is required")
                return None
            return default
        value = self.data[key]
        # bool is an int subclass; TOML `true` is never a valid port or timeout.
        if isinstance(value, bool) and bool not in accept:
            value_ok = False
        else:
            value_ok = isinstance(value, accept)
        if not value_ok:
            shown = "" if secret else f" ({value!r})"
            self.error(key, f"must be {kind}, not {_type_name(value)}{shown}")
            return None if default is _MISSING else default
        return value

    def string(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
        """A string; `secret` keeps the value out of error messages (passwords)."""
        self._note(key, "string", default, choices)
        value = self._get(key, default, (str,), "a string", secret)
        if choices is not None and isinstance(value, str) and value not in choices:
            names = ", ".join(f'"{c}"' for c in choices)
            self.error(key, f'must be one of {names}, not "{value}"')
            return None
        return value

    def integer(self, key: str, default: Any = _MISSING, minimum: int | None = None, maximum: int | None = None) -> Any:
        self._note(key, "integer", default, None, minimum, maximum)
        value = self._get(key, default, (int,), "an integer")
        if isinstance(value, int) and value is not default:
            if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
                self.error(key, f"must be from {minimum} to {maximum}, not {value}")
                return None
        return value

    def seconds(self, key: str, default: Any = _MISSING) -> Any:
        self._note(key, "seconds", default)
        value = self._get(key, default, (int, float), "a number of seconds")
        if isinstance(value, (int, float)) and value is not default and not value > 0:
            self.error(key, f"must be a positive number of seconds, not {value}")
            return None
        return float(value) if isinstance(value, (int, float)) else value

    def strings(self, key: str, default: Any = _MISSING) -> Any:
        """An array of strings (a single string is taken as an array of one)."""
        self._note(key, "strings", default)
        value = self._get(key, default, (list, str), "a string or an array of strings")
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list):
            wrong = [item for item in value if not isinstance(item, str)]
            if wrong:
                self.error(key, f"must hold only strings, not {_type_name(wrong[0])} ({wrong[0]!r})")
                return None
            return tuple(value)
        return value

    def file(self, key: str, default: Any = _MISSING) -> Any:
        """A file name, made absolute against the configuration file's folder; whether
        the file is usable is for its reader to say."""
        self._note(key, "file", default)
        value = self._get(key, default, (str,), "a string")
        if isinstance(value, str) and value is not default:
            if not value:
                self.error(key, "must name a file, not be empty")
                return None
            value = os.path.expanduser(value)
            if self.errors.base_dir is not None and not os.path.isabs(value):
                value = os.path.join(self.errors.base_dir, value)
        return value

    def number(self, key: str, default: Any = _MISSING) -> Any:
        """A number of seconds that may be 0 (a delay that can be turned off)."""
        self._note(key, "number", default)
        value = self._get(key, default, (int, float), "a number of seconds")
        if isinstance(value, (int, float)) and value is not default and value < 0:
            self.error(key, f"must be 0 or more seconds, not {value}")
            return None
        return float(value) if isinstance(value, (int, float)) else value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        self._note(key, "boolean", default)
        return self._get(key, default, (bool,), "true or false")

    def table(self, key: str, default: Any = _MISSING, secret: bool = False) -> Table | None:
        """A sub-table; `secret` keeps a wrongly typed value out of error messages."""
        self._note(key, "table", default)
        value = self._get(key, default, (dict,), "a table", secret)
        if not isinstance(value, dict):
            return None
        return Table(value, self.key_path(key), self.errors)

    def tables(self, key: str) -> Iterator[Table]:
        """The tables of an array of tables (`[[key]]`), each with its index in its path."""
        self._note(key, "tables", REQUIRED)
        value = self._get(key, [], (list,), "an array of tables")
        for index, item in enumerate(value or ()):
            path = f"{self.key_path(key)}[{index}]"
            if isinstance(item, dict):
                yield Table(item, path, self.errors)
            else:
                self.errors.add(path, f"must be a table, not {_type_name(item)} ({item!r})")

    def rest(self) -> dict[str, Any]:
        """Every key not read yet, marked as read (options handed on to someone else)."""
        rest = {k: v for k, v in self.data.items() if k not in self._read}
        self._read.update(rest)
        return rest

    def check(self, key: str, parse: Callable[[Any], T]) -> T | None:
        """Run `parse` on an already-read value, turning its ValueError into a message."""
        try:
            return parse(self.data[key])
        except (ValueError, TypeError) as e:
            self.error(key, str(e))
            return None

    def consume(self, key: str) -> None:
        """Mark `key` as read without reading it (it was reported some other way)."""
        self._read.add(key)

    def finish(self) -> None:
        """Report every key present but never read (once), with the known key it is
        closest to when there is one (a typo: `idle_timout`)."""
        known = sorted(k for k in self._read if k not in self.data)
        for key in self.data:
            if key not in self._read:
                if self.path and key in self.errors.top_level_keys:
                    self.error(key, "unknown key (a top-level key must come before the first [table] in TOML)")
                elif close := difflib.get_close_matches(key, known, n=1, cutoff=0.8):
                    self.error(key, f'unknown key (did you mean "{close[0]}"?)')
                else:
                    self.error(key, "unknown key")
                self._read.add(key)
