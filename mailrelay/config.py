"""
TOML configuration -> typed, validated objects.

`load_config()` reads the whole file and reports every problem at once (file, key
path, reason) as a `ConfigError`; a `Config` that exists is complete and consistent, so
nothing listens until the whole configuration is valid.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.endpoints import serverFromString

from .configtable import ConfigError, Errors, Table
from .router import MODES, PROTOCOLS
from .routers import RouterSpec, parse_router

__all__ = ["Config", "ConfigError", "ListenerConfig", "UpstreamConfig", "load_config", "parse_config"]

# Modes and protocols this version serves; the others are named in the SPEC and
# arrive with their own issues, so a config asking for them gets a clear refusal.
AVAILABLE_MODES = ("splice",)
AVAILABLE_PROTOCOLS = {"splice": ("none",)}


TOP_LEVEL_KEYS = frozenset({"drain_timeout"})


@attrs.frozen
class UpstreamConfig:
    """`[upstream]`: how the shared connector reaches upstream servers."""

    connect_timeout: float = 10.0


@attrs.frozen
class ListenerConfig:
    """One `[[listener]]`."""

    name: str
    listen: str
    mode: str
    protocol: str
    router: RouterSpec | None
    """This listener's own router; None means the configuration's default router."""
    idle_timeout: float = 3600.0
    router_timeout: float = 30.0


@attrs.frozen
class Config:
    """A whole, valid configuration."""

    source: str
    listeners: tuple[ListenerConfig, ...]
    router: RouterSpec | None
    upstream: UpstreamConfig = UpstreamConfig()
    drain_timeout: float = 30.0

    def router_for(self, listener: ListenerConfig) -> RouterSpec | None:
        return listener.router or self.router


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML file; raise ConfigError naming the file otherwise."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([f"{source}: no such file"]) from None
    except OSError as e:
        raise ConfigError([f"{source}: cannot read: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{source}: not valid TOML: {e}"]) from None
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate already-parsed TOML data (a `.tac` file or a test may build it in Python)."""
    errors = Errors(source, TOP_LEVEL_KEYS)
    top = Table(dict(data), "", errors)
    drain_timeout = top.seconds("drain_timeout", 30.0)

    upstream = UpstreamConfig()
    upstream_table = top.table("upstream", None)
    if upstream_table is not None:
        upstream = UpstreamConfig(connect_timeout=upstream_table.seconds("connect_timeout", 10.0))
        upstream_table.finish()

    router_table = top.table("router", None)
    default_router = _router(router_table)

    listeners = [_listener(t) for t in top.tables("listener")]
    if not top.has("listener") or top.data["listener"] == []:
        # `listener = []` is an array of no tables: as good as no listener at all.
        top.error("listener", "at least one [[listener]] is required")
    top.finish()

    valid = [listener for listener in listeners if listener is not None]
    seen: dict[str, int] = {}
    for index, listener in enumerate(listeners):
        if listener is None:
            continue
        if listener.name in seen:
            errors.add(f"listener[{index}].name", f'"{listener.name}" is already the name of listener[{seen[listener.name]}]')
        seen.setdefault(listener.name, index)
    errors.raise_if_any()
    return Config(
        source=source,
        listeners=tuple(valid),
        router=default_router,
        upstream=upstream,
        drain_timeout=drain_timeout,
    )


def _router(table: Table | None) -> RouterSpec | None:
    if table is None:
        return None
    spec = parse_router(table)
    table.finish()
    return spec


def _listener(table: Table) -> ListenerConfig | None:
    listen = table.string("listen")
    if isinstance(listen, str):
        listen = _check_endpoint(table, listen)
    name = table.string("name", listen)
    mode = table.string("mode", choices=MODES)
    if mode is not None and mode not in AVAILABLE_MODES:
        table.error("mode", f'"{mode}" is not available in this version of mailrelay (available: {", ".join(AVAILABLE_MODES)})')
        mode = None
    protocol = table.string("protocol", "none", choices=PROTOCOLS)
    if mode is not None and protocol is not None and protocol not in AVAILABLE_PROTOCOLS[mode]:
        available = ", ".join(AVAILABLE_PROTOCOLS[mode])
        table.error("protocol", f'"{protocol}" is not available with mode "{mode}" in this version (available: {available})')
        protocol = None
    idle_timeout = table.seconds("idle_timeout", 3600.0)
    router_timeout = table.seconds("router_timeout", 30.0)
    router_table = table.table("router", None)
    router = _router(router_table)
    table.finish()
    if None in (listen, name, mode, protocol, idle_timeout, router_timeout) or (router_table and router is None):
        return None
    return ListenerConfig(
        name=name,
        listen=listen,
        mode=mode,
        protocol=protocol,
        router=router,
        idle_timeout=idle_timeout,
        router_timeout=router_timeout,
    )


def _check_endpoint(table: Table, description: str) -> str | None:
    """Parse a server endpoint string without listening; report why it is wrong."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as e:  # endpoint parsers raise ValueError, TypeError...
        reason = str(e) or type(e).__name__
        table.error("listen", f'bad endpoint "{description}": {reason}')
        return None
    return description
