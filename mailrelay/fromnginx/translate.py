"""
A whole nginx configuration -> a `Translation`, and a `Translation` -> TOML text.

`translate(directives)` looks for `mail {}` and `stream {}` at the main level (and
`worker_processes`, the one main-level directive that maps: `workers`); everything
else at the main level, in `http {}` and `events {}` is ignored silently, since it
does not concern a mail proxy. `render(translation, source)` writes the TOML, each
listener under a comment naming the nginx lines it came from.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from . import toml
from .mail import translate_mail
from .parser import Directive, walk
from .result import Translation
from .stream import translate_stream
from .tlspool import TLSPool

__all__ = ["render", "translate"]


def translate(directives: tuple[Directive, ...]) -> Translation:
    """Translate the main level of a parsed nginx configuration."""
    t = Translation()
    pool = TLSPool()
    for directive in directives:
        if directive.name == "mail" and directive.block is not None:
            t.found_blocks = True
            t.mapped(directive, "its servers become listeners with an http router")
            translate_mail(directive, t, pool)
        elif directive.name == "stream" and directive.block is not None:
            t.found_blocks = True
            t.mapped(directive, "its servers become listeners with static routers")
            translate_stream(directive, t, pool)
        elif directive.name == "worker_processes" and directive.args:
            value = directive.args[0]
            if value == "auto":
                t.top["workers"] = "auto"
                t.mapped(directive, 'workers = "auto"')
            elif value.isdigit() and 1 <= int(value) <= 1024:
                if int(value) > 1:
                    t.top["workers"] = int(value)
                t.mapped(directive, "workers")
            else:
                t.warn(directive, "not a number of processes: one worker")
        else:
            for inner in walk((directive,)):
                t.ignored(inner, "not part of a mail {} or stream {} block")
    pool.finish(t)
    _share_router(t)
    return t


def _share_router(t: Translation) -> None:
    """Listeners that all have the same auth_http router get it as the default
    `[router]` (static routers stay beside their listeners, where they are read)."""
    routers = Counter(toml.value(listener.keys["router"]) for listener in t.listeners)
    if len(routers) != 1 or t.listeners[0].keys["router"]["type"] != "http":
        return
    t.router = t.listeners[0].keys["router"]
    for listener in t.listeners:
        del listener.keys["router"]


def render(t: Translation, source: str, version: str) -> str:
    """The translation as a mailrelay TOML file."""
    parts: list[str] = []
    warnings = t.warnings()
    head = [
        f"mailrelay configuration translated from {source} by `mailrelay from-nginx` (mailrelay {version}).",
        "Check it with `mailrelay check FILE`; run it with `twistd -n mailrelay --config FILE`.",
    ]
    if warnings:
        head.append(f"{len(warnings)} nginx directive(s) could not be translated exactly (also printed on stderr):")
        head.extend(f"  {note.line()}" for note in warnings)
    parts.append(toml.table(None, t.top, head))
    if t.upstream:
        parts.append(toml.table("[upstream]", t.upstream))
    if t.tls:
        parts.append(toml.table("[tls]", t.tls, [f"from {line}" for line in t.tls_comment]))
        for entry in t.sni:
            parts.append(toml.table("[[tls.sni]]", entry))
    if t.router is not None:
        parts.append(toml.table("[router]", _router_keys(t.router), ["every listener's router"]))
    for listener in t.listeners:
        keys = dict(listener.keys)
        router = keys.pop("router", None)
        parts.append(toml.table("[[listener]]", keys, listener.comment))
        if router is not None:
            parts.append(toml.table("[listener.router]", _router_keys(router)))
    return "\n".join(parts).rstrip("\n") + "\n"


def _router_keys(router: dict[str, Any]) -> dict[str, Any]:
    return dict(router)
