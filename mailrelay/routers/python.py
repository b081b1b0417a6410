"""`type = "python"`: a Router class named as `package.module:Class`, built with the
table's other keys as keyword arguments."""

from __future__ import annotations

import importlib
import traceback
from typing import Any

from ..configtable import ConfigError, Table
from ..router import IRouter, verifies_passwords
from ..routerspec import RouterSpec


def load_class(spec: str) -> type:
    """Import `package.module:Class`; ValueError says what is wrong with `spec`."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f'must look like "package.module:Class", not "{spec}"')
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an import runs arbitrary code: report whatever it raised
        raise ValueError(f'cannot import module "{module_name}": {_import_failure(module_name, e)}') from e
    target: Any = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ValueError(f'module "{module_name}" has no "{attribute}"')
    if not isinstance(target, type):
        raise ValueError(f'"{spec}" is not a class')
    if not (IRouter.implementedBy(target) or callable(getattr(target, "route", None))):
        raise ValueError(f'"{spec}" is not a Router: it has no route() method')
    return target


def _import_failure(module_name: str, error: Exception) -> str:
    """Why importing `module_name` failed, in words that say where to look."""
    missing = error.name if isinstance(error, ModuleNotFoundError) else None
    if missing is not None and (module_name == missing or module_name.startswith(missing + ".")):
        return (
            f'no module "{missing}" on mailrelay\'s Python path (install it into the environment mailrelay runs in,'
            " or add the folder holding it to PYTHONPATH)"
        )
    if isinstance(error, SyntaxError):  # its text names the file and line
        return f"importing it raised {type(error).__name__}: {error}"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"importing it raised {error!r}{where}"


def parse(table: Table) -> RouterSpec | None:
    spec = table.string("class")
    options = table.rest()
    if spec is None:
        return None
    try:
        cls = load_class(spec)
    except ValueError as e:
        table.error("class", str(e))
        return None

    def build(reactor: Any = None, password_listeners: Any = ()) -> IRouter:
        try:
            router = cls(**options)
        except Exception as e:
            raise ConfigError([f"{table.errors.source}: {table.path}: {spec}(**{sorted(options)}) failed: {e!r}"]) from e
        return IRouter(router, router)

    description = f"python: {spec}" + (f" with {', '.join(sorted(options))}" if options else "")
    # What the class declares; routes it answers are checked against it at run time.
    return RouterSpec("python", description, build, verifies_passwords=verifies_passwords(cls))
