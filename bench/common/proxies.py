"""
The third-party proxies the benchmarks compare mailrelay with, when they are on PATH:
haproxy and nginx's stream proxy in front of the plain upstream (terminating TLS with
the run's certificates if asked), and nginx's mail proxy for the SMTP and IMAP
benchmarks (`launch_nginx` with their configuration). A proxy that is not wanted, not
installed or cannot run here is skipped with the reason; one that fails to start too,
with its output on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from common.processes import Children
from common.targets import Certificates, Target, free_port, wait_until_serving
from common.upstream import Upstream


class Unavailable(Exception):
    """A proxy that cannot run on this machine (a module nginx lacks): skipped, not failed."""


def start_other(args: argparse.Namespace, name: str, start: Callable[[str], Target]) -> tuple[Target | None, str | None]:
    """
    Proxy `name` started by `start(its binary)` when wanted (not --no-others) and on
    PATH: (its target, None), or (None, why it is skipped).
    """
    if not args.others:
        return None, f"{name} (--no-others)"
    binary = shutil.which(name)
    if binary is None:
        return None, f"{name} (not on PATH)"
    try:
        return start(binary), None
    except Unavailable as e:
        return None, f"{name} ({e})"
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"{name} failed to start:\n{e}", file=sys.stderr)
        return None, f"{name} (failed to start: {str(e).splitlines()[0]})"


def start_others(
    args: argparse.Namespace,
    children: Children,
    workdir: Path,
    targets: list[Target],
    upstream: Upstream,
    certs: Certificates | None = None,
    workers: int = 1,
) -> list[str]:
    """
    haproxy and nginx in front of the plain upstream (terminating TLS with `certs`), those
    that `start_other` starts added to `targets`; returns what was skipped and why. With
    `workers` > 1 they are haproxy-tN (`nbthread N`) and nginx-wN (`worker_processes N`).
    """
    skipped = []
    for name, starter in (("haproxy", start_haproxy), ("nginx", start_nginx)):
        target, why = start_other(args, name, lambda binary: starter(children, workdir, binary, upstream, certs, workers))
        if target is not None:
            targets.append(target)
        if why is not None:
            skipped.append(why)
    return skipped


def launch_proxy(children: Children, workdir: Path, target: Target, argv: list[str], how: str, logs: list[str]) -> Target:
    """Start a third-party proxy for `target` and wait until it serves; its output and `logs` explain a failure."""
    name = target.name
    with open(workdir / f"{name}.out", "wb") as out:
        proc = children.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    target.pgid, target.proc, target.note = proc.pid, proc, f"{argv[0]} {how}"
    try:
        wait_until_serving(target, proc, 10, name)
    except RuntimeError as e:
        text = "".join(
            (workdir / log).read_text(errors="replace")[-1500:] for log in [f"{name}.out", *logs] if (workdir / log).exists()
        )
        raise RuntimeError(f"{e}\n{text}") from None
    return target


HAPROXY_CONFIG = """\
global
    maxconn 4096
    nbthread {threads}
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
listen bulk
    bind 127.0.0.1:{p_bulk}{ssl}
    server upstream 127.0.0.1:{u_bulk}
listen smtp
    bind 127.0.0.1:{p_line}{ssl}
    server upstream 127.0.0.1:{u_line}
"""


def _terminating(target: Target, certs: Certificates | None) -> Target:
    """A proxy's target, reached over TLS when it terminates TLS with `certs`."""
    if certs is not None:
        target.dial, target.until_closed = certs.dial, True
    return target


def start_haproxy(
    children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates | None, threads: int = 1
) -> Target:
    """haproxy in front of the plain upstream ports; with `certs`, terminating TLS; `threads` > 1: haproxy-tN."""
    p_bulk, p_line = free_port(), free_port()
    name = "haproxy" if threads == 1 else f"haproxy-t{threads}"
    config = workdir / f"{name}.cfg"
    ssl = f" ssl crt {certs.combined}" if certs else ""
    config.write_text(
        HAPROXY_CONFIG.format(p_bulk=p_bulk, p_line=p_line, u_bulk=upstream.bulk, u_line=upstream.line, ssl=ssl, threads=threads)
    )
    target = _terminating(Target(name, p_bulk, p_line, None), certs)
    how = f"-db (mode tcp, bind ... ssl crt, nbthread {threads})" if certs else f"-db (mode tcp, nbthread {threads})"
    return launch_proxy(children, workdir, target, [binary, "-db", "-f", str(config)], how, [])


NGINX_PREAMBLE = """\
daemon off;
worker_processes {workers};
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log;
{user}
{load_module}
events {{ worker_connections 8192; }}
"""
"""The start of every nginx configuration the benchmarks write (a format string)."""

NGINX_STREAM = """\
stream {{{stream_ssl}
    server {{ listen 127.0.0.1:{p_bulk}{ssl}; proxy_pass 127.0.0.1:{u_bulk}; }}
    server {{ listen 127.0.0.1:{p_line}{ssl}; proxy_pass 127.0.0.1:{u_line}; }}
}}
"""

NGINX_STREAM_SSL = """
    ssl_certificate {chain};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default stops at TLSv1.2"""


def start_nginx(
    children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates | None, workers: int = 1
) -> Target:
    """nginx's stream proxy in front of the plain upstream ports; with `certs`, terminating TLS; `workers` > 1: nginx-wN."""
    p_bulk, p_line = free_port(), free_port()
    body = NGINX_STREAM.format(
        p_bulk=p_bulk,
        p_line=p_line,
        u_bulk=upstream.bulk,
        u_line=upstream.line,
        stream_ssl=NGINX_STREAM_SSL.format(chain=certs.chain, key=certs.key) if certs else "",
        ssl=" ssl" if certs else "",
    )
    target = _terminating(Target("nginx" if workers == 1 else f"nginx-w{workers}", p_bulk, p_line, None), certs)
    how = f"(stream, listen ... ssl, worker_processes {workers})" if certs else f"(stream proxy_pass, worker_processes {workers})"
    return launch_nginx(children, workdir, binary, "stream", body, target, how, workers)


def launch_nginx(
    children: Children, workdir: Path, binary: str, module: str, body: str, target: Target, how: str, workers: int = 1
) -> Target:
    """
    nginx at `binary` with its `module` ("stream", "mail"), `workers` worker processes and
    the configuration `body` (its `stream {...}` or `mail {...}` block) serving `target`,
    until it serves; Unavailable if this nginx has no such module. Its files are named
    after the target (`nginx.conf`, `nginx-error.log`), so that several can run.
    """
    usable, load_module = nginx_module(binary, module)
    if not usable:
        raise Unavailable(load_module)
    name = target.name
    config = workdir / f"{name}.conf"
    preamble = NGINX_PREAMBLE.format(workdir=workdir, name=name, workers=workers, user=nginx_user_line(), load_module=load_module)
    config.write_text(preamble + body)
    argv = [binary, "-p", f"{workdir}/", "-c", str(config), "-e", f"{workdir}/{name}-error.log"]
    return launch_proxy(children, workdir, target, argv, how, [f"{name}-error.log"])


NGINX_MAIL = """\
mail {{
    auth_http 127.0.0.1:{auth_port}/auth;{mail}
    server {{
        listen 127.0.0.1:{port};
        protocol {protocol};
        server_name relay.bench.example;
        starttls {starttls};
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default stops at TLSv1.2{server}
    }}
}}
"""


def launch_nginx_mail(
    children: Children,
    workdir: Path,
    binary: str,
    target: Target,
    certs: Certificates,
    protocol: str,
    auth_port: int,
    mail: tuple[str, ...] = (),
    server: tuple[str, ...] = (),
    starttls: str = "only",
) -> Target:
    """
    nginx's mail proxy for `protocol` on `target`'s line port, STARTTLS with `certs`
    (`starttls`: "only", or "on" for optional), asking the auth_http service on
    `auth_port` where each login goes; `mail` and `server` are the protocol's own
    directives in the `mail` and `server` blocks.
    """
    body = NGINX_MAIL.format(
        auth_port=auth_port,
        mail="".join(f"\n    {directive}" for directive in mail),
        port=target.line_port,
        protocol=protocol,
        chain=certs.chain,
        key=certs.key,
        server="".join(f"\n        {directive}" for directive in server),
        starttls=starttls,
    )
    directives = ", ".join(directive.rstrip(";") for directive in (*server, *mail))
    how = f"(mail, protocol {protocol}, starttls {starttls}, {directives}, auth_http, worker_processes 1)"
    return launch_nginx(children, workdir, binary, "mail", body, target, how)


def nginx_module(binary: str, name: str) -> tuple[bool, str]:
    """
    Whether nginx at `binary` can run its `name` module ("stream", "mail"): built in
    (`--with-NAME` in `nginx -V`), or as ngx_NAME_module.so in one of the usual module
    directories. Returns (usable, its load_module line or "" / why not).
    """
    info = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    flags = info.stdout + info.stderr
    if re.search(rf"--with-{name}(?=\s|$)", flags):
        return True, ""
    paths = re.findall(r"--modules-path=(\S+)", flags)
    prefix = re.findall(r"--prefix=(\S+)", flags)
    relocated = Path(binary).resolve().parent.parent / "lib" / "nginx" / "modules"  # e.g. /usr/sbin -> /usr/lib
    candidates = [
        *paths,
        *[p + "/modules" for p in prefix],
        str(relocated),
        "/usr/lib/nginx/modules",
        "/usr/lib64/nginx/modules",
        "/usr/share/nginx/modules",
        "/usr/local/nginx/modules",
    ]
    for directory in candidates:
        module = Path(directory) / f"ngx_{name}_module.so"
        if module.exists():
            return True, f"load_module {module};"
    if f"--with-{name}=dynamic" in flags:
        return False, f"nginx has a dynamic {name} module but ngx_{name}_module.so was not found"
    return False, f"nginx was built without the {name} module and no ngx_{name}_module.so was found"


def nginx_user_line() -> str:
    """nginx run as root wants an unprivileged user for its workers."""
    if os.geteuid() != 0:
        return ""
    import grp

    def has_group(name: str) -> bool:
        try:
            grp.getgrnam(name)
            return True
        except KeyError:
            return False

    group = next((g for g in ("nogroup", "nobody") if has_group(g)), "root")
    return f"user nobody {group};"
