"""The report of a benchmark: what ran where, the tables, and how each proxy was run."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from common.logs import mailrelay_log_summary, mailrelay_warnings
from common.targets import Target


def twisted_version() -> str:
    try:
        from importlib.metadata import version

        return version("twisted")
    except Exception:
        return "?"


def print_machine(title: str) -> None:
    """The first lines of a report: what ran where, and how busy the machine already was."""
    print(f"{title}  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}")
    print(
        f"machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"Twisted {twisted_version()}"
    )
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (anything else running skews the numbers)")


def print_targets(heading: str, targets: list[Target], legend: dict[str, str]) -> None:
    """`HEADING: a, b, c`, then a line per target: its name and what it is (`legend`)."""
    names = [t.name for t in targets]
    width = max(len(name) for name in names)
    print(f"{heading}: {', '.join(names)}")
    for name in names:
        print(f"  {name:<{width}} {legend[name]}")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_grid(table: list[list[str]]) -> None:
    """Rows of cells, the first one a heading: first column left-aligned, the others right."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_table(rows: list[tuple[str, str]], targets: list[str], values: dict[tuple[str, str], Any]) -> None:
    head = ["measurement", "direct"]
    for name in targets[1:]:
        head += [name, "ratio"]
    table = [head]
    for key, label in rows:
        direct = values.get((key, "direct"))
        line = [label, fmt(direct) if isinstance(direct, float) else str(direct or "-")]
        for name in targets[1:]:
            v = values.get((key, name))
            if isinstance(v, float):
                line.append(fmt(v))
                line.append(f"{v / direct:.2f}" if isinstance(direct, float) and direct else "-")
            else:
                line += [str(v or "-"), "-"]
        table.append(line)
    print_grid(table)


def print_cpu_table(
    rows: list[tuple[str, str]], names: list[str], cpu: dict[tuple[str, str], dict[str, float]], machine: bool = False
) -> None:
    """
    One line per measurement (its `_med` and `_p99` rows folded in): client / upstream /
    proxy CPU per target, and with `machine` what all cores were busy with, kernel included.
    """
    parties = ["client", "upstream", "proxy"] + (["machine"] if machine else [])
    whole = f" / whole machine (all {os.cpu_count()} cores: at most {100 * (os.cpu_count() or 1)})" if machine else ""
    print(f"CPU use during each measurement, % of one core: client / upstream / proxy{whole}")
    table = [["measurement", *names]]
    keys = {key for key, _ in rows}
    for key, label in rows:
        base = key[: -len("_med")] if key.endswith("_med") else key
        if key.endswith("_p99") or (base != key and base in keys):
            continue
        line = [label.replace(" median", "")]
        for name in names:
            c = cpu.get((base, name))
            line.append("-" if c is None else " / ".join(f"{c[party]:.0f}" for party in parties))
        table.append(line)
    print_grid(table)


def pyopenssl_version() -> str:
    try:
        from OpenSSL import SSL

        return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except Exception:
        return "OpenSSL ?"


def print_logs_and_notes(targets: list[Target]) -> None:
    """After the tables: each mailrelay log's session summary and its unusual lines, then
    how each proxy was run (targets[0] is the direct connection)."""
    for t in targets:
        if t.log_files:
            print(mailrelay_log_summary("mailrelay", t.log_files, by_listener=True))
            warnings = mailrelay_warnings(t.log_files)
            if warnings:
                print("mailrelay log, lines other than closed sessions (most frequent first):")
                print("\n".join(warnings))
    for note in dict.fromkeys(f"{t.name if t.name in ('haproxy', 'nginx') else 'mailrelay'}: {t.note}" for t in targets[1:]):
        print(note)
