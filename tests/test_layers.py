"""
Imports inside mailrelay/ run one way: a module imports modules of its own layer or of
lower ones, never of a higher one, and no chain of imports comes back to where it
started.

Every `import` and `from ... import` of a mailrelay module counts, wherever it stands:
at module level, under `if TYPE_CHECKING:`, inside a function. Importing a module of a
subpackage also runs the subpackage's `__init__`, so it counts as importing that too
(except for the importer's own packages, which are already running). Strings that a
registry imports on demand (`mailrelay.routerspec.ROUTER_TYPES`) are not imports: that
is what keeps the configuration from loading every router backend.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import deque
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mailrelay"

LAYERS: list[tuple[str, set[str]]] = [
    (
        "leaf helpers",
        {"logtext", "configtable", "interfaces", "networks", "timers", "redisurl", "listening", "reactor", "zerocopy", "version"},
    ),
    ("value types and pure logic", {"router", "sasl", "clienthello", "proxyprotocol"}),
    ("I/O-free protocol cores", {"core"}),
    # The configuration holds their settings (ServerTLSConfig, LoginLimits,
    # ConnectionLimits), so they sit below it.
    ("components the configuration holds the settings of", {"tls", "tls_*", "guard", "connlimits"}),
    ("configuration", {"config", "routerspec", "schema"}),
    (
        "Twisted plumbing",
        {
            "ask",
            "splice",
            "session",
            "connector",
            "proxy_endpoint",
            "metrics",
            "metrics_web",
            "workers",
            "workerlog",
            "shared",
        },
    ),
    ("router backends", {"routers"}),
    ("sessions", {"relay", "protocols", "listener", "proxied"}),
    ("top", {"service", "tap", "__main__", "testing", "__init__", "worker", "demo", "fromnginx", "reference"}),
]
"""Lowest first. A module is named by its path below mailrelay/ (`routers.map`; a
package by its folder, `routers`; mailrelay/__init__.py is `__init__`). A name matches
itself, the modules below it (`core` holds `core.smtp`), and shell wildcards (`tls_*`)."""

KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()
"""(importer, imported) edges left out of the cycle check for now; nothing else is."""

CORE = "core"
CORE_MAY_IMPORT = ("leaf helpers", "value types and pure logic")
"""The only layers a protocol core may import besides its own; of the rest of the
world, only the standard library and attrs: a core never touches Twisted."""
CORE_THIRD_PARTY = frozenset({"attrs"})


@attrs.frozen
class Import:
    importer: str
    imported: str
    where: str
    """`path:line`, for messages."""


def module_names() -> dict[str, Path]:
    """Every module of the package by its name here (see LAYERS)."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _package_of(module: str, path: Path) -> list[str]:
    """The package a module's relative imports start from, as name parts."""
    if module == "__init__":
        return []
    parts = module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _named(parts: list[str], modules: Iterable[str]) -> str | None:
    name = ".".join(parts) or "__init__"
    return name if name in modules else None


def _ancestors(module: str) -> list[str]:
    """The subpackages holding `module` (the top package, always running, excluded)."""
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


@attrs.frozen
class Graph:
    modules: dict[str, Path]
    edges: list[Import]
    """Between modules of mailrelay/."""
    outside: list[Import]
    """Of other packages, by their top-level name (`twisted`)."""
    unknown: list[Import]
    """Of names that are no module of mailrelay/ (a module removed, a typo)."""


def import_graph() -> Graph:
    """Every import statement of every module of mailrelay/, at any depth."""
    modules = module_names()
    graph = Graph(modules, [], [], [])
    for module, path in modules.items():
        _add_imports(graph, module, path)
    return graph


def _add_imports(graph: Graph, module: str, path: Path) -> None:
    package = _package_of(module, path)
    own = {module, *_ancestors(module)}

    def add(parts: list[str], where: str) -> None:
        target = _named(parts, graph.modules)
        if target is None:
            graph.unknown.append(Import(module, ".".join(parts), where))
            return
        if target != module:
            graph.edges.append(Import(module, target, where))
        graph.edges.extend(Import(module, name, where) for name in _ancestors(target) if name not in own)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, *rest = alias.name.split(".")
                if top == "mailrelay":
                    add(rest, where)
                else:
                    graph.outside.append(Import(module, top, where))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.level - 1 <= len(package), f"{where}: a relative import above mailrelay/"
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module is not None and node.module.split(".")[0] == "mailrelay":
                base = node.module.split(".")[1:]
            else:
                graph.outside.append(Import(module, (node.module or "").split(".")[0], where))
                continue
            for alias in node.names:
                # `from .pkg import module` imports a module; `from .module import name`
                # imports the module that holds the name.
                submodule = [*base, alias.name]
                add(submodule if _named(submodule, graph.modules) else base, where)


def layer_of(module: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if fnmatch(module, pattern) or module.startswith(pattern + "."):
                return index
    return None


def find_cycles(edges: list[Import]) -> list[list[Import]]:
    """One shortest cycle through each strongly connected set of modules."""
    following: dict[str, dict[str, Import]] = {}
    for edge in edges:
        following.setdefault(edge.importer, {}).setdefault(edge.imported, edge)
    cycles: list[list[Import]] = []
    seen: set[str] = set()
    for start in sorted(following):
        if start in seen:
            continue
        # Breadth first from `start`: the shortest way back to it, if any.
        paths: dict[str, list[Import]] = {start: []}
        queue = deque([start])
        cycle: list[Import] | None = None
        while queue and cycle is None:
            here = queue.popleft()
            for there, edge in sorted(following.get(here, {}).items()):
                if there == start:
                    cycle = paths[here] + [edge]
                    break
                if there not in paths:
                    paths[there] = paths[here] + [edge]
                    queue.append(there)
        if cycle is not None:
            cycles.append(cycle)
            seen.update(edge.importer for edge in cycle)
    return cycles


def describe(cycle: list[Import]) -> str:
    chain = " -> ".join([cycle[0].importer] + [edge.imported for edge in cycle])
    return chain + "\n" + "\n".join(f"    {edge.importer} imports {edge.imported} at {edge.where}" for edge in cycle)


def test_every_import_names_a_module() -> None:
    unknown = [f"{i.where}: {i.importer} imports {i.imported}, which is no module of mailrelay/" for i in import_graph().unknown]
    assert not unknown, "\n".join(unknown)


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(module for module in import_graph().modules if layer_of(module) is None)
    assert not unplaced, f"put these modules in one of LAYERS in {__file__}: {', '.join(unplaced)}"


def test_no_import_cycle() -> None:
    edges = import_graph().edges
    gone = KNOWN_CYCLE_EDGES - {(edge.importer, edge.imported) for edge in edges}
    assert not gone, f"no longer imported: take {sorted(gone)} out of KNOWN_CYCLE_EDGES"
    cycles = find_cycles([edge for edge in edges if (edge.importer, edge.imported) not in KNOWN_CYCLE_EDGES])
    assert not cycles, "import cycles in mailrelay/:\n" + "\n".join(describe(cycle) for cycle in cycles)


def test_no_module_imports_a_higher_layer() -> None:
    upward: set[str] = set()
    for edge in import_graph().edges:
        low, high = layer_of(edge.importer), layer_of(edge.imported)
        if low is not None and high is not None and high > low:
            upward.add(f"{edge.where}: {edge.importer} ({LAYERS[low][0]}) imports {edge.imported} ({LAYERS[high][0]})")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_protocol_cores_import_no_twisted_and_only_low_layers() -> None:
    """Passes with no mailrelay/core yet, or an empty one."""
    graph = import_graph()
    core = layer_of(CORE)
    allowed = {index for index, (name, _) in enumerate(LAYERS) if name in CORE_MAY_IMPORT} | {core}
    wrong = [
        f"{i.where}: {i.importer} imports {i.imported}"
        for i in graph.outside
        if layer_of(i.importer) == core
        and i.imported not in sys.stdlib_module_names
        and i.imported not in CORE_THIRD_PARTY
        and i.imported != "__future__"
    ]
    wrong += [
        f"{i.where}: {i.importer} imports {i.imported}"
        for i in graph.edges
        if layer_of(i.importer) == core and layer_of(i.imported) not in allowed
    ]
    assert not wrong, "protocol cores must not do I/O nor import what does:\n" + "\n".join(sorted(wrong))


def test_protocol_cores_load_no_twisted_at_all() -> None:
    """Not only their own imports: nothing a core imports, nor what that imports, loads
    Twisted (mailrelay/__init__.py, which starts the service, is left out: a core is
    imported here as a plain package would be)."""
    cores = sorted(name for name in module_names() if layer_of(name) == layer_of(CORE))
    script = textwrap.dedent(
        f"""
        import importlib, sys, types
        package = types.ModuleType("mailrelay")
        package.__path__ = [{str(PACKAGE)!r}]
        sys.modules["mailrelay"] = package
        for name in {cores!r}:
            importlib.import_module("mailrelay." + name)
        print(" ".join(sorted(m for m in sys.modules if m.split(".")[0] == "twisted")))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert cores, "no protocol core found"
    assert not result.stdout.split(), f"importing the cores loaded {result.stdout.strip()}"


def test_configuration_loads_no_router_backend() -> None:
    """Reading the configuration needs neither twisted.web (the http router's) nor any
    router backend: they are imported when a `[router]` table of their type is read."""
    script = textwrap.dedent(
        """
        import sys
        import mailrelay.config
        loaded = sorted(m for m in sys.modules if m == "twisted.web" or m.startswith(("twisted.web.", "mailrelay.routers.")))
        print(" ".join(loaded))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = result.stdout.split()
    assert not loaded, f"import mailrelay.config loaded {', '.join(loaded)}"


def test_the_router_registry_names_backends_that_load() -> None:
    from mailrelay import routerspec

    for target in (*routerspec.ROUTER_TYPES.values(), routerspec.CACHED):
        module = target.partition(":")[0]
        assert layer_of(module.removeprefix("mailrelay.")) == layer_of("routers"), target
        assert callable(routerspec.load(target)), target


# -- the checks themselves ------------------------------------------------------------------


def write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return {name: root / name for name in files}


@pytest.fixture
def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    package = tmp_path / "mailrelay"
    package.mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    monkeypatch.setattr(sys.modules[__name__], "KNOWN_CYCLE_EDGES", set())
    return package


def test_every_kind_of_import_is_an_edge(fake_package: Path) -> None:
    write(
        fake_package,
        {
            "__init__.py": "from .config import Config\n",
            "config.py": """
                from typing import TYPE_CHECKING
                from . import router
                if TYPE_CHECKING:
                    from .routers.map import MapRouter
                def late():
                    import mailrelay.session
                    from mailrelay import core
            """,
            "router.py": "",
            "session.py": "",
            "core/__init__.py": "",
            "routers/__init__.py": "",
            "routers/map.py": "from ..router import Route\nfrom . import cache\n",
            "routers/cache.py": "",
        },
    )
    found = {(edge.importer, edge.imported) for edge in import_graph().edges}
    assert found == {
        ("__init__", "config"),
        ("config", "router"),
        ("config", "routers.map"),
        ("config", "routers"),  # runs routers/__init__.py first
        ("config", "session"),
        ("config", "core"),
        ("routers.map", "router"),
        ("routers.map", "routers.cache"),
    }


def test_a_cycle_under_type_checking_is_found_and_shown(fake_package: Path) -> None:
    write(
        fake_package,
        {
            "__init__.py": "",
            "a.py": "from .b import B\n",
            "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\n",
            "c.py": "def f():\n    from .a import A\n",
        },
    )
    [cycle] = find_cycles(import_graph().edges)
    assert describe(cycle).splitlines()[0] == "a -> b -> c -> a"
    with pytest.raises(AssertionError, match="c imports a at mailrelay/c.py:2"):
        test_no_import_cycle()


def test_a_known_edge_is_left_out_until_it_is_gone(fake_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write(fake_package, {"__init__.py": "", "a.py": "from .b import B\n", "b.py": "from . import a\n"})
    monkeypatch.setattr(sys.modules[__name__], "KNOWN_CYCLE_EDGES", {("b", "a")})
    test_no_import_cycle()
    files["b.py"].write_text("")
    with pytest.raises(AssertionError, match=r"take \[\('b', 'a'\)\] out of KNOWN_CYCLE_EDGES"):
        test_no_import_cycle()


def test_an_upward_import_and_twisted_in_a_core_are_refused(fake_package: Path) -> None:
    write(
        fake_package,
        {
            "__init__.py": "",
            "router.py": "from .listener import Factory\n",
            "listener.py": "",
            "core/__init__.py": "",
            "core/smtp.py": "import attrs\nfrom twisted.internet import defer\nfrom ..router import Route\nfrom ..tls import X\n",
            "tls.py": "",
        },
    )
    with pytest.raises(AssertionError, match=r"router \(value types and pure logic\) imports listener \(sessions\)"):
        test_no_module_imports_a_higher_layer()
    with pytest.raises(AssertionError) as refused:
        test_protocol_cores_import_no_twisted_and_only_low_layers()
    assert "core.smtp imports twisted" in str(refused.value)
    assert "core.smtp imports tls" in str(refused.value)
    assert "attrs" not in str(refused.value) and "imports router" not in str(refused.value)
