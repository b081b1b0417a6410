"""
The configuration reference, `docs/configuration.md`, rendered from `mailrelay.schema`:

    python -m mailrelay.reference > docs/configuration.md

`tests/test_reference.py` fails when the file and `render()` differ, and when the
schema and what the parser reads differ.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .schema import REQUIRED, SCHEMA, Key, Section

__all__ = ["example", "render", "toml_value"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

KIND_NAMES = {
    "string": "string",
    "integer": "integer",
    "seconds": "seconds (> 0)",
    "number": "seconds (≥ 0)",
    "boolean": "boolean",
    "strings": "string or array of strings",
    "file": "file name",
    "table": "table",
    "tables": "array of tables",
}


def toml_value(value: Any) -> str:
    """`value` written as TOML (strings, numbers, booleans, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string of printable text is a TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"no TOML for {value!r}")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _section(path: str) -> Section:
    return next(section for section in SCHEMA if section.path == path)


def _default(key: Key) -> str:
    if key.shown_default:
        return key.shown_default
    if key.default is REQUIRED:
        return "**required**"
    if key.default is None:
        return "not set"
    return f"`{toml_value(key.default)}`"


def _type(key: Key) -> str:
    text = KIND_NAMES[key.kind]
    if key.choices:
        text = "one of " + ", ".join(f"`{c}`" for c in key.choices)
    if key.minimum is not None or key.maximum is not None:
        low = "" if key.minimum is None else f"{key.minimum:,}"
        high = "" if key.maximum is None else f"{key.maximum:,}"
        text += f", {low}…{high}" if key.maximum is not None else f", ≥ {low}"
    return text


def _applies(key: Key) -> str:
    parts = []
    if key.modes:
        parts.append("mode " + " and ".join(f"`{m}`" for m in key.modes))
    if key.protocols:
        parts.append("protocol " + ", ".join(f"`{p}`" for p in key.protocols))
    return f" *Only for listeners with {' and '.join(parts)}.*" if parts else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _heading(section: Section) -> str:
    return f"`{section.title}`" if section.title.startswith("[") else section.title


def _anchor(title: str) -> str:
    """GitHub's heading anchor."""
    text = re.sub(r"[^\w\- ]", "", title.lower())
    return text.replace(" ", "-")


def _table(section: Section) -> str:
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key in section.keys:
        description = key.description + _applies(key)
        rows.append(f"| `{key.name}` | {_cell(_type(key))} | {_cell(_default(key))} | {_cell(description)} |")
    return "\n".join(rows) + "\n"


def _line(key: Key, commented: bool) -> str:
    shows_example = key.default is None or key.default is REQUIRED
    value = key.example if shows_example else key.default
    if key.choices:
        hint = " | ".join(key.choices)
    elif shows_example and key.shown_default:
        hint = "default: " + key.shown_default.replace("`", "")
    else:
        hint = ""
    text = f"{'# ' if commented else ''}{key.name} = {toml_value(value)}"
    return f"{text:<39} # {hint}" if hint else text


def _keys(section: Section, commented: bool = True, skip: tuple[str, ...] = ()) -> list[str]:
    """A line per key that is not a table; required keys are written out unless all are
    commented, the others show their default (or an example when they have none)."""
    lines = []
    for key in section.keys:
        if key.name in skip or (key.kind in ("table", "tables") and not isinstance(key.example, dict)):
            continue
        lines.append(_line(key, commented or key.default is not REQUIRED))
    return lines


def example() -> str:
    """A complete commented configuration: what is not commented out is a valid minimal
    configuration (one `tls` listener routed to one upstream), every other key is shown
    commented out with its default or an example value."""
    out = ["# Top-level keys come before the first [table].", *_keys(_section("")), ""]
    out += ["[[listener]]", *_keys(_section("listener"), commented=False)]
    out += [
        '# router = { type = "static", host = "10.0.0.5", port = 143 }   # this listener\'s own router',
        "",
        "# [listener.connection_limits]",
        *_keys(_section("listener.connection_limits")),
        "",
        "[router]",
        'type = "static"                         # static | http | map | python',
        *_keys(_section("router"), skip=("type",)),
        *_keys(_section("route"), commented=False),
        '# routes = [{ host = "10.0.0.5", port = 143 }, { host = "10.0.0.6", port = 143 }]   # fallbacks',
        "",
        '# [router]                              # type = "http"',
        *_keys(_section("router(http)")),
        "",
        '# [router]                              # type = "map"',
        *_keys(_section("router(map)")),
        "# [[router.rule]]",
        *_keys(_section("rule"), skip=("routes", "reject", "reject_wait")),
        '# route = { host = "10.0.0.5", port = 143 }     # or routes = [{ ... }, { ... }]',
        "# [[router.rule]]",
        '# domain = "old.example.org"',
        *[line for line in _keys(_section("rule")) if line.startswith(("# reject", "# routes"))],
        "# [router.default]                      # a route's keys, or route, routes, reject",
        '# host = "10.0.0.9"',
        "# port = 143",
        "",
        '# [router]                              # type = "python"',
        *_keys(_section("router(python)")),
        '# region = "eu"                         # any other key: a keyword argument of the class',
    ]
    for path in ("upstream", "tls", "tls.sni", "login_limits", "metrics", "redis", "log"):
        section = _section(path)
        out += ["", f"# {section.title}", *_keys(section)]
    return "\n".join(out) + "\n"


def render() -> str:
    """The text of `docs/configuration.md`."""
    parts = [
        "# Configuration reference\n\n"
        "Generated from `mailrelay/schema.py` by `python -m mailrelay.reference > docs/configuration.md`;\n"
        "`tests/test_reference.py` fails when this file, the schema and the parser disagree.\n\n"
        "A configuration is one TOML file, given to `twistd mailrelay --config FILE`. Check one with\n"
        "`mailrelay check FILE`: it reports every mistake at once (file, key, reason) and shows the\n"
        "settings. File names are relative to the configuration file's folder; durations are in\n"
        "seconds (`2.5` is fine). An unknown key is an error, and so is a key set where it would do\n"
        "nothing (`preread_sni` on a `tls` listener).\n\n"
        "## Contents\n\n"
        "- [A complete example](#a-complete-example)\n"
        + "".join(f"- [{_heading(s)}](#{_anchor(s.title)})\n" for s in SCHEMA)
        + "\n## A complete example\n\n"
        "What is not commented out is a valid configuration: one `tls` listener (with a self-signed\n"
        "certificate, as there is no `[tls]`) routed to one upstream. Every other key is shown commented\n"
        "out, with its default or, when it has none, an example value.\n\n"
        "```toml\n" + example() + "```\n"
    ]
    for section in SCHEMA:
        text = f"\n## {_heading(section)}\n\n{section.intro}\n"
        if section.keys:
            text += "\n" + _table(section)
        if section.free_keys:
            text += f"\n{section.free_keys}\n"
        parts.append(text)
    return "".join(parts)


if __name__ == "__main__":
    print(render(), end="")
