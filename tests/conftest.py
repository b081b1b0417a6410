"""Fixtures every test module may ask for by name (pytest finds them here, not by import)."""

pytest_plugins = ("tests.support.processes", "tests.support.mail")
