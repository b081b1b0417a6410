"""
The configuration reference cannot drift: `docs/configuration.md` is `render()` of
`mailrelay.schema`, and the schema is what the parser reads.

The parser is run with `mailrelay.configtable.recording` on over a corpus (every example
configuration, the map files they name, and configurations generated from the schema's
own example values for each listener mode and protocol and each router type); every key
it reads must be declared in the schema with the same type, default, choices and bounds,
and every declared key must be read at least once.
"""

from __future__ import annotations

import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from zope.interface import implementer

from mailrelay.config import parse_config
from mailrelay.configtable import KeyRead, read_toml, recording
from mailrelay.reference import example, render, toml_value
from mailrelay.router import IRouter, Route, RouteRequest
from mailrelay.routers import components
from mailrelay.routers.map_rules import read_map_file
from mailrelay.schema import COMPUTED, KINDS, REQUIRED, SAME, SCHEMA, Key, Section, keys

ROOT = Path(__file__).resolve().parent.parent
DOCUMENT = ROOT / "docs" / "configuration.md"
EXAMPLES = ROOT / "examples"
MAIL = ("smtp", "imap", "pop3")
LISTENER_KINDS = [("splice", "none"), ("tls", "none"), *[(mode, p) for mode in ("tls", "starttls") for p in MAIL]]

Keys = dict[str, tuple[Section, Key]]


# -- the document ------------------------------------------------------------------


def test_document_is_generated() -> None:
    assert DOCUMENT.read_text() == render(), "regenerate it: python -m mailrelay.reference > docs/configuration.md"


def test_module_prints_the_document() -> None:
    printed = subprocess.run([sys.executable, "-m", "mailrelay.reference"], capture_output=True, text=True, check=True, cwd=ROOT)
    assert printed.stdout == render()


def test_the_example_is_a_valid_configuration() -> None:
    """What the reference's example leaves uncommented parses, and shows every key."""
    import tomllib

    text = example()
    config = parse_config(tomllib.loads(text), "example")
    assert [listener.mode for listener in config.listeners] == ["tls"]
    for path, (_, key) in keys().items():
        if key.kind not in ("table", "tables") or isinstance(key.example, dict):
            assert re.search(rf"^(# )?{re.escape(key.name)} = ", text, re.M), f"{path} is not in the example"


def test_every_key_is_described_with_a_usable_value() -> None:
    for path, (_, key) in keys().items():
        assert key.kind in KINDS, path
        assert key.description.strip().endswith((".", ")")), f"{path}: describe it in a sentence"
        if key.kind not in ("table", "tables"):
            assert key.value is not None and key.value is not REQUIRED, f"{path} needs an example value"
        if key.choices and key.value is not None:
            assert key.value in key.choices, path
    titles = [section.title for section in SCHEMA]
    assert len(titles) == len(set(titles))


# -- which schema key a key read is ------------------------------------------------

ROUTER_CHILDREN = {
    "router(static).routes": "route",
    "router(http).headers": "router(http).headers",
    "router(map).rule": "rule",
    "router(map).default": "default",
}
ANSWER_KEYS = ("route", "routes", "reject", "reject_wait")
_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def schema_path(concrete: str, data: dict[str, Any], map_file: bool, declared: Keys) -> str:
    """The schema path of the key read at `concrete` in `data` (a configuration, or a
    map file's top level): indices dropped, a router's keys under its type, a route's
    and a rule's under `route` and `rule` wherever they are written; a free key (an HTTP
    header) is `<its table>.*`."""
    context = "map_file" if map_file else ""
    node: Any = data
    segments = [(m.group(1), [int(i) for i in re.findall(r"\d+", m.group(2))]) for m in _SEGMENT.finditer(concrete)]
    for position, (name, indices) in enumerate(segments):
        path, child = _step(context, name, node, declared)
        if position == len(segments) - 1:
            return path
        node = node[name]
        for index in indices:
            node = node[index]
        context = child
    raise AssertionError(f"empty key path {concrete!r}")


def _step(context: str, name: str, node: Any, declared: Keys) -> tuple[str, str]:
    """(the schema path of `name` read in `context`, the context of its own keys)."""
    if context == "router":
        if f"router.{name}" in declared:
            return f"router.{name}", ""
        section = f"router({node.get('type')})"
        path = f"{section}.{name}"
        if path in declared:
            return path, ROUTER_CHILDREN.get(path, "")
        if section == "router(static)":
            return f"route.{name}", ""  # a static router's one route, written in [router]
        return path, ""
    if context == "default":
        return (f"rule.{name}", "route") if name in ANSWER_KEYS else (f"route.{name}", "")
    if context == "router(http).headers":
        return f"{context}.*", ""
    if context == "rule":
        return f"rule.{name}", "route" if name in ("route", "routes") else ""
    if context == "map_file":
        return f"map_file.{name}", name
    path = f"{context}.{name}" if context else name
    return path, "router" if name == "router" else path


# -- comparing reads with the schema -----------------------------------------------


@attrs.frozen
class Read:
    key: KeyRead
    data: dict[str, Any]
    map_file: bool


def _same(a: Any, b: Any) -> bool:
    """Equal defaults: 30 and 30.0 are, a list and a tuple of the same items are; a
    boolean is only ever equal to a boolean (True == 1 in Python)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return bool(a == b)


def disagreements(reads: list[Read], declared: Keys) -> tuple[list[str], set[str]]:
    """What the parser read that the schema does not say, one line per key; and the
    schema paths read."""
    problems: dict[str, str] = {}
    seen: set[str] = set()
    for read in reads:
        r = read.key
        path = schema_path(r.concrete, read.data, read.map_file, declared)
        where = f"{r.concrete} in {r.source}"
        if path.endswith(".*"):
            section = next((s for s in SCHEMA if s.path == path[:-2]), None)
            if section is None or not section.free_keys or r.kind != "string":
                problems.setdefault(path, f"{path}: the parser reads {where} as {r.kind}, but the schema has no such free key")
            continue
        seen.add(path)
        if path not in declared:
            problems.setdefault(path, f"{path}: the parser reads {where} ({r.kind}), but mailrelay/schema.py does not declare it")
            continue
        _, key = declared[path]
        if r.kind != key.kind:
            problems.setdefault(path, f"{path}: the parser reads {where} as {r.kind}, the schema says {key.kind}")
            continue
        if r.kind not in ("table", "tables"):
            expected = key.default if key.read_default is SAME else key.read_default
            if expected is not COMPUTED:
                if (expected is REQUIRED) != (r.default is REQUIRED) or (
                    expected is not REQUIRED and not _same(expected, r.default)
                ):
                    shown = "required (or read only when present)"
                    problems.setdefault(
                        path,
                        f"{path}: default: the parser's is {shown if r.default is REQUIRED else repr(r.default)} ({where}),"
                        f" the schema's {shown if expected is REQUIRED else repr(expected)}",
                    )
        if (r.choices or ()) != key.choices:
            problems.setdefault(path, f"{path}: choices: the parser's are {r.choices} ({where}), the schema's {key.choices}")
        if (r.minimum, r.maximum) != (key.minimum, key.maximum):
            problems.setdefault(
                path,
                f"{path}: bounds: the parser's are {r.minimum}..{r.maximum} ({where}), the schema's {key.minimum}..{key.maximum}",
            )
    return sorted(problems.values()), seen


# -- the corpus --------------------------------------------------------------------


def _section(path: str) -> Section:
    return next(section for section in SCHEMA if section.path == path)


def values(path: str, mode: str | None = None, protocol: str | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every key of a section that applies to a listener of `mode` and `protocol`, at its
    example value (tables left to the caller, but for an inline table's example)."""
    table: dict[str, Any] = {}
    for key in _section(path).keys:
        if key.name in skip or (key.kind in ("table", "tables") and not isinstance(key.example, dict)):
            continue
        if (key.modes and mode not in key.modes) or (key.protocols and protocol not in key.protocols):
            continue
        table[key.name] = key.value
    return table


def _rules() -> list[dict[str, Any]]:
    conditions = values("rule", skip=("password", *ANSWER_KEYS))
    rule = _section("rule")
    reject = {k.name: k.value for k in rule.keys if k.name in ("reject", "reject_wait")}
    password = {k.name: k.value for k in rule.keys if k.name == "password"}
    return [
        conditions | {"route": values("route")},
        conditions | {"routes": [values("route"), values("route")]},
        conditions | reject,
        conditions | password | {"route": values("route") | {"login": "xclient"}},
    ]


def _routers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A router table of each type, with every key that applies."""
    common = values("router", skip=("type",))
    yield {"type": "static"} | common | values("route")
    yield {"type": "static"} | common | {"routes": [values("route"), values("route") | {"tls": "none"}]}
    yield {"type": "http"} | common | values("router(http)")
    inline = values("router(map)", skip=("file", "check_interval"))
    yield {"type": "map"} | common | inline | {"rule": _rules(), "default": values("route")}
    yield {"type": "map"} | common | inline | {"rule": _rules()[:1], "default": {"routes": [values("route")]}}
    yield {"type": "map"} | common | inline | {"rule": _rules()[:1], "default": {"reject": "no", "reject_wait": 1}}
    yield {"type": "map"} | common | values("router(map)")
    yield {"type": "python"} | common | values("router(python)") | {"region": "eu"}


def _map_file(tmp_path: Path) -> Path:
    """The map file the schema's example `file` names, with every rule key."""
    lines = []
    for rule in _rules():
        lines += ["[[rule]]", *(f"{name} = {toml_value(value)}" for name, value in rule.items())]
    lines += ["[default]", *(f"{name} = {toml_value(value)}" for name, value in values("route").items())]
    path = tmp_path / _section("router(map)").keys[0].value
    path.write_text("\n".join(lines) + "\n")
    return path


def generated(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Configurations using every schema key at its example value: a listener of each
    mode and protocol, each with a router of each type of its own."""
    tls = values("tls") | {"sni": [values("tls.sni", skip=("name",)), values("tls.sni", skip=("names",))]}
    top = values("") | {
        "upstream": values("upstream"),
        "tls": tls,
        "login_limits": values("login_limits"),
        "metrics": values("metrics"),
        "redis": values("redis"),
        "log": values("log"),
        "router": {"type": "static"} | values("route"),
    }
    for router in _routers(tmp_path):
        for mode, protocol in LISTENER_KINDS:
            listener = values("listener", mode, protocol) | {"mode": mode, "protocol": protocol}
            listener["connection_limits"] = values("listener.connection_limits")
            listener["router"] = router
            yield top | {"listener": [listener]}


@implementer(IRouter)
class _ExampleRouter:
    """What the schema's example `class` names."""

    verifies_passwords = False

    def __init__(self, **options: Any) -> None:
        self.options = options

    def route(self, request: RouteRequest) -> list[Route]:
        return []


@pytest.fixture
def example_router_class(monkeypatch: pytest.MonkeyPatch) -> None:
    module_name, _, class_name = _section("router(python)").keys[0].value.partition(":")
    package = module_name.partition(".")[0]
    module = types.ModuleType(module_name)
    setattr(module, class_name, _ExampleRouter)
    monkeypatch.setitem(sys.modules, package, types.ModuleType(package))
    monkeypatch.setitem(sys.modules, module_name, module)


def _record(reads: list[Read], data: dict[str, Any], map_file: bool) -> Callable[[KeyRead], None]:
    return lambda key: reads.append(Read(key, data, map_file))


def corpus(tmp_path: Path) -> list[Read]:
    """Every key read while parsing the examples, their map files and the generated
    configurations (each of which must be valid)."""
    reads: list[Read] = []
    map_files: set[Path] = set()
    for path in sorted(EXAMPLES.glob("*.toml")):
        data, _ = read_toml(path)
        routers = [data.get("router"), *(listener.get("router") for listener in data.get("listener", []))]
        map_files.update(EXAMPLES / r["file"] for r in routers if isinstance(r, dict) and "file" in r)
    for path in sorted(set(EXAMPLES.glob("*.toml")) - map_files):
        data, _ = read_toml(path)
        with recording(_record(reads, data, False)):
            parse_config(data, str(path), base_dir=str(EXAMPLES), systemd_sockets_later=True)
    for path in sorted(map_files | {_map_file(tmp_path)}):
        data, _ = read_toml(path)
        with recording(_record(reads, data, True)):
            read_map_file(str(path))
    for data in generated(tmp_path):
        with recording(_record(reads, data, False)):
            parse_config(data, "generated", base_dir=str(tmp_path))
    return reads


@pytest.mark.usefixtures("example_router_class")
def test_the_parser_reads_what_the_schema_declares(tmp_path: Path) -> None:
    declared = keys()
    problems, seen = disagreements(corpus(tmp_path), declared)
    assert not problems, "mailrelay/schema.py and the parser disagree:\n" + "\n".join(problems)
    unread = sorted(set(declared) - seen)
    assert not unread, f"declared in mailrelay/schema.py but never read by the parser: {', '.join(unread)}"


@pytest.mark.usefixtures("example_router_class")
def test_generated_configurations_are_valid(tmp_path: Path) -> None:
    """Each schema example value is valid where the schema says the key applies."""
    count = 0
    for data in generated(tmp_path):
        config = parse_config(data, "generated", base_dir=str(tmp_path))
        assert len(config.listeners) == 1
        spec = config.listeners[0].router
        assert spec is not None
        if spec.type == "python":
            # The keys the schema cannot list (free_keys) reach the class.
            router: Any = components(spec.build())[-1]  # inside the cache (cache_ttl)
            assert router.options == {"region": "eu"}
        count += 1
    assert count == len(list(_routers(tmp_path))) * len(LISTENER_KINDS)


def test_workers_auto_is_valid() -> None:
    """`workers` is read as an integer unless it is "auto" (no Table method reads that)."""
    assert '"auto"' in keys()["workers"][1].description
    listener = values("listener", "splice", "none") | {"mode": "splice", "protocol": "none"}
    assert parse_config({"workers": "auto", "listener": [listener], "router": {"type": "static"} | values("route")}).workers >= 1


# -- the comparison can fail -------------------------------------------------------


def _without(path: str) -> Keys:
    declared = keys()
    del declared[path]
    return declared


def _changed(path: str, **changes: Any) -> Keys:
    declared = keys()
    section, key = declared[path]
    declared[path] = (section, attrs.evolve(key, **changes))
    return declared


@pytest.mark.parametrize(
    ("declared", "expected"),
    [
        (_without("listener.idle_timeout"), r"listener\.idle_timeout: the parser reads .* does not declare it"),
        (
            _changed("listener.idle_timeout", default=60),
            r"listener\.idle_timeout: default: the parser's is 3600\.0 .* the schema's 60$",
        ),
        (
            _changed("route.port", kind="string"),
            r"route\.port: the parser reads \S*router\.port in .* as integer, the schema says string",
        ),
        (_changed("log.sessions", choices=("text",)), r"log\.sessions: choices"),
        (_changed("route.port", maximum=65536), r"route\.port: bounds: the parser's are 1\.\.65535 .* the schema's 1\.\.65536"),
        (
            _changed("listener.trusted_proxies", read_default=SAME),
            r"listener\.trusted_proxies: default: the parser's is required",
        ),
        (_changed("listener.name", read_default=SAME), r"listener\.name: default: the parser's is '(tcp|systemd):"),
        (_without("router(http).max_connections"), r"router\(http\)\.max_connections: the parser reads .* does not declare"),
        (_without("rule.password"), r"rule\.password: the parser reads .*password in .*routes\.toml"),
        (_without("route.tls_ca"), r"route\.tls_ca: the parser reads"),
    ],
)
@pytest.mark.usefixtures("example_router_class")
def test_a_disagreement_names_the_key(tmp_path: Path, declared: Keys, expected: str) -> None:
    problems, _ = disagreements(corpus(tmp_path), declared)
    assert any(re.match(expected, problem) for problem in problems), problems


@pytest.mark.usefixtures("example_router_class")
def test_a_key_never_read_is_found(tmp_path: Path) -> None:
    declared = keys()
    section, key = declared["listener.idle_timeout"]
    declared["listener.idle_time"] = (section, attrs.evolve(key, name="idle_time"))
    _, seen = disagreements(corpus(tmp_path), declared)
    assert set(declared) - seen == {"listener.idle_time"}
