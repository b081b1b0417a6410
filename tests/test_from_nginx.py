"""
`mailrelay from-nginx`: nginx's own documented mail and stream examples
(tests/data/nginx/, each naming its page) and the configurations the benchmarks write
are translated; every directive is mapped, warned about or ignored with a reason; the
warnings reach stderr as `file:line: directive: ...`; the output passes `check`; and
the mappings that matter have exactly the keys expected. Then the parser: quotes,
escapes, comments, include files and globs, and its errors' file:line.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailrelay.__main__ import check, main
from mailrelay.fromnginx.parser import Directive, NginxSyntaxError, parse_file, parse_text, walk
from mailrelay.fromnginx.translate import translate

DATA = Path(__file__).resolve().parent / "data" / "nginx"
ROOT = Path(__file__).resolve().parent.parent

# Certificate paths in the documented examples, replaced in a temporary copy by real
# files so that `check` can load them.
DOCUMENTED_PATHS = (
    "/usr/local/nginx/conf/cert.pem",
    "/usr/local/nginx/conf/cert.key",
    "/etc/ssl/certs/server.crt",
    "/etc/ssl/certs/server.key",
    "/etc/nginx/trusted_ca_cert.crt",
    "example.com.rsa.crt",
    "example.com.rsa.key",
    "example.com.ecdsa.crt",
    "example.com.ecdsa.key",
)


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, str]:
    """A real certificate and key per documented path (a CA for the trusted one)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("mail.example.com", "localhost")
    folder = tmp_path / "pki"
    folder.mkdir()
    cert, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    ca.cert_pem.write_to_path(str(ca_file))
    chosen = {}
    for path in DOCUMENTED_PATHS:
        if "trusted" in path:
            chosen[path] = str(ca_file)
        else:
            chosen[path] = str(key if path.endswith(".key") else cert)
    return chosen


def copy_with_paths(source: Path, folder: Path, paths: dict[str, str]) -> Path:
    """`source` (and the conf.d/ beside it) copied into `folder`, paths replaced."""
    folder.mkdir(exist_ok=True)
    shutil.copytree(DATA / "conf.d", folder / "conf.d", dirs_exist_ok=True)
    text = source.read_text()
    for old, new in sorted(paths.items(), key=lambda item: -len(item[0])):
        text = text.replace(f" {old};", f" {new};")
    target = folder / source.name
    target.write_text(text)
    return target


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    code = main(["from-nginx", *argv], prog="mailrelay")
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def translated(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> tuple[dict[str, Any], list[str], Path]:
    out = tmp_path / "mailrelay.toml"
    code, _, errors = run(capsys, str(config), "-o", str(out))
    assert code == 0, errors
    return tomllib.loads(out.read_text()), errors, out


def assert_every_directive_accounted(config: Path, errors: list[str]) -> None:
    """Every directive of the file (and its includes) has a note; every warning is on
    stderr as `file:line: name: ...`."""
    directives = parse_file(str(config))
    t = translate(directives)
    missing = [d.where + " " + d.name for d in walk(directives) if not t.noted(d)]
    assert missing == []
    for note in t.warnings():
        assert note.line() in errors
    assert len([line for line in errors if not line.startswith("mailrelay from-nginx:")]) == len(t.warnings())


def assert_checks(out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert check(str(out)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


EXAMPLES = sorted(p.name for p in DATA.glob("*.conf"))


@pytest.mark.parametrize("name", EXAMPLES)
def test_documented_example_is_translated_checked_and_accounted_for(
    name: str, tmp_path: Path, certificates: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = copy_with_paths(DATA / name, tmp_path / "nginx", certificates)
    data, errors, out = translated(capsys, config, tmp_path)
    assert data["listener"]
    assert_every_directive_accounted(config, errors)
    assert_checks(out, capsys)


def listeners(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {listener["name"]: listener for listener in data["listener"]}


def test_mail_core_example_keys(tmp_path: Path, certificates: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    data, errors, _ = translated(capsys, DATA / "mail_core.conf", tmp_path)
    assert data["workers"] == "auto"
    assert data["router"] == {"type": "http", "url": "http://localhost:9000/cgi-bin/nginxauth.cgi"}
    by_name = listeners(data)
    assert sorted(by_name) == ["imap-143", "pop3-110", "smtp-25", "smtp-587"]
    smtp = by_name["smtp-587"]
    assert smtp["listen"] == "tcp:587"
    # A plain nginx port takes passwords in the clear: mailrelay requires STARTTLS, warned.
    assert (smtp["mode"], smtp["starttls"]) == ("starttls", "required")
    assert smtp["auth"] == ["plain", "login", "cram-md5"]
    assert smtp["size"] == 10485760
    assert smtp["capabilities"] == ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN"]
    assert smtp["hostname"] == "mail.example.com"
    assert by_name["pop3-110"]["auth"] == ["plain", "login", "apop", "cram-md5"]
    # mailrelay advertises IMAP4rev1, LITERAL+ and USER itself.
    assert by_name["imap-143"]["capabilities"] == ["UIDPLUS", "IDLE", "QUOTA"]
    assert by_name["pop3-110"]["capabilities"] == ["LAST", "TOP", "PIPELINING", "UIDL"]
    assert any(line.startswith(f"{DATA / 'mail_core.conf'}:17: xclient: ") and "Mailrelay-Login: none" in line for line in errors)
    assert any(":23: listen: a plain port where nginx takes passwords in the clear" in line for line in errors)


def test_mail_tls_keys(tmp_path: Path, certificates: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    config = copy_with_paths(DATA / "mail_proxy.conf", tmp_path / "nginx", certificates)
    data, errors, out = translated(capsys, config, tmp_path)
    assert data["tls"] == {
        "cert": certificates["/etc/ssl/certs/server.crt"],
        "key": certificates["/etc/ssl/certs/server.key"],
        "min_version": "1.0",
        "ciphers": "HIGH:!aNULL:!MD5",
    }
    by_name = listeners(data)
    # `ssl on` at the mail level: implicit TLS everywhere but where a server says off.
    assert {name: listener["mode"] for name, listener in by_name.items()} == {
        "smtp-25": "tls",
        "pop3-110": "tls",
        "imap-143": "tls",
        "smtp-587": "starttls",
    }
    assert by_name["smtp-587"]["starttls"] == "required"
    assert "starttls" not in by_name["imap-143"]
    assert any(":16: ssl_protocols: " in line and "obsolete" in line for line in errors)
    shown = assert_checks(out, capsys)
    assert 'listener "smtp-587": tcp:587 mode=starttls protocol=smtp' in shown


def test_mail_auth_http_and_realip_keys(tmp_path: Path, certificates: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    config = copy_with_paths(DATA / "mail_auth_realip.conf", tmp_path / "nginx", certificates)
    data, errors, _ = translated(capsys, config, tmp_path)
    assert data["router"] == {
        "type": "http",
        "url": "http://127.0.0.1:9000/auth",
        "headers": {"X-Auth-Key": "secret_string"},
        "timeout": 5,
    }
    by_name = listeners(data)
    mx = by_name["smtp-25"]
    assert (mx["auth"], mx["mode"], mx["starttls"]) == (["none"], "starttls", "optional")
    assert (mx["login_timeout"], mx["max_errors"], mx["idle_timeout"]) == (300, 3, 3600)
    pop3 = by_name["pop3-110"]
    assert pop3["proxy_protocol"] is True
    assert pop3["trusted_proxies"] == ["192.168.1.0/24", "192.168.2.1", "2001:0db8::/32"]
    submission = by_name["smtp-2525"]
    assert submission["listen"] == "tcp:2525:interface=127.0.0.1:backlog=1024"
    assert submission["starttls"] == "optional"
    expected = {
        "auth_http_pass_client_cert": "Auth-SSL-Cert",
        "proxy_protocol": "Mailrelay-Proxy-Protocol: 1",
        "resolver": "no reverse lookup",
        "smtp_greeting_delay": "no equivalent",
        "proxy_smtp_auth": "Mailrelay-Login: passthrough",
        "smtp_auth": 'add "plain", "login"',
        "listen": "so_keepalive",
    }
    for name, words in expected.items():
        assert any(f": {name}: " in line and words in line for line in errors), name


def test_stream_core_example_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, errors, _ = translated(capsys, DATA / "stream_core.conf", tmp_path)
    assert data["upstream"] == {"connect_timeout": 1}
    # The UDP server and the one proxying to a UNIX socket have no equivalent.
    assert [listener["name"] for listener in data["listener"]] == ["stream-12345"]
    (listener,) = data["listener"]
    assert listener == {
        "name": "stream-12345",
        "listen": "tcp:12345",
        "mode": "splice",
        "protocol": "none",
        "idle_timeout": 3,
        "router": {
            "type": "static",
            "routes": [{"host": "backend1.example.com", "port": 12345}, {"host": "127.0.0.1", "port": 12345}],
        },
    }
    for words in ("UDP has no equivalent", "unix:/tmp/stream.socket", "weight=5", "max_fails=3", "hash: "):
        assert any(words in line for line in errors), words


def test_stream_upstream_backups_go_last(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, _, _ = translated(capsys, DATA / "stream_upstream.conf", tmp_path)
    routes = data["listener"][0]["router"]["routes"]
    assert [route["host"] for route in routes] == [
        "backend1.example.com",
        "backend2.example.com",
        "backup1.example.com",
        "backup2.example.com",
    ]


def test_stream_ssl_preread_map_uses_its_default_and_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, errors, _ = translated(capsys, DATA / "stream_ssl_preread.conf", tmp_path)
    (listener,) = data["listener"]
    assert listener["preread_sni"] is True
    assert listener["router"]["routes"] == [{"host": "192.168.0.3", "port": 12345}, {"host": "192.168.0.4", "port": 12345}]
    assert any(":7: map: " in line and "not by SNI name" in line for line in errors)
    assert any(":8: backend.example.com: not translated" in line for line in errors)


def test_stream_tls_proxy_protocol_and_include_glob(
    tmp_path: Path, certificates: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    config = copy_with_paths(DATA / "stream_ssl_proxy_protocol.conf", tmp_path / "nginx", certificates)
    data, errors, _ = translated(capsys, config, tmp_path)
    by_name = listeners(data)
    tls = by_name["stream-12345"]
    assert (tls["mode"], tls["protocol"]) == ("tls", "none")
    assert tls["router"]["routes"] == [{"host": "127.0.0.1", "port": 8080, "proxy_protocol": 1}]
    assert data["tls"]["min_version"] == "1.2"
    # listen and set_real_ip_from come from conf.d/realip.conf, included with a glob.
    behind = by_name["stream-12346"]
    assert behind["proxy_protocol"] is True
    assert behind["trusted_proxies"] == ["192.168.1.0/24", "192.168.2.1", "2001:0db8::/32"]
    assert behind["router"]["routes"] == [
        {"host": "backend.example.com", "port": 993, "tls": "tls", "tls_ca": certificates["/etc/nginx/trusted_ca_cert.crt"]}
    ]
    assert any(line.startswith("ssl_session_cache") or ": ssl_session_cache: " in line for line in errors)


def test_several_certificates_become_sni_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = trustme.CA()
    files = {}
    for name in ("imap", "pop"):
        leaf = pki.issue_cert(f"{name}.example.org")
        files[name] = tmp_path / f"{name}.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(files[name]))
    config = tmp_path / "nginx.conf"
    config.write_text(
        f"""mail {{
            auth_http 127.0.0.1:9000/auth;
            server {{ listen 993 ssl; server_name imap.example.org; ssl_certificate {files["imap"]}; }}
            server {{ listen 995 ssl; server_name pop.example.org; ssl_certificate {files["pop"]}; }}
        }}"""
    )
    data, errors, out = translated(capsys, config, tmp_path)
    assert data["tls"] == {"cert": str(files["imap"]), "sni": [{"cert": str(files["pop"]), "names": ["pop.example.org"]}]}
    assert any(": ssl_certificate: [[tls.sni]]" in line for line in errors)
    assert_checks(out, capsys)


def test_dual_stack_wildcards_become_one_listener(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text("stream { server { listen 2525; listen [::]:2525; proxy_pass 127.0.0.1:25; } }")
    data, _, out = translated(capsys, config, tmp_path)
    assert [listener["listen"] for listener in data["listener"]] == ["tcp6:2525:interface=\\:\\:"]
    assert_checks(out, capsys)


def test_benchmark_configurations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The nginx configurations bench/common/proxies.py writes, translated and checked."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from common import proxies
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.bench.example")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(chain), append=True)
    preamble = proxies.NGINX_PREAMBLE.format(workdir=tmp_path, name="nginx", workers=2, user="", load_module="")
    stream = proxies.NGINX_STREAM.format(
        p_bulk=20001,
        p_line=20002,
        u_bulk=20003,
        u_line=20004,
        ssl=" ssl",
        stream_ssl=proxies.NGINX_STREAM_SSL.format(chain=chain, key=key),
    )
    mail = proxies.NGINX_MAIL.format(
        auth_port=20005,
        mail="\n    proxy_smtp_auth on;\n    xclient off;",
        port=20006,
        protocol="smtp",
        chain=chain,
        key=key,
        server="\n        smtp_auth plain;",
        starttls="only",
    )
    for name, body in (("stream", stream), ("mail", mail)):
        config = tmp_path / f"{name}.conf"
        config.write_text(preamble + body)
        data, errors, out = translated(capsys, config, tmp_path)
        assert_every_directive_accounted(config, errors)
        assert data["workers"] == 2
        assert_checks(out, capsys)
        if name == "stream":
            assert [(lst["listen"], lst["mode"], lst["router"]["routes"]) for lst in data["listener"]] == [
                ("tcp:20001:interface=127.0.0.1", "tls", [{"host": "127.0.0.1", "port": 20003}]),
                ("tcp:20002:interface=127.0.0.1", "tls", [{"host": "127.0.0.1", "port": 20004}]),
            ]
        else:
            (listener,) = data["listener"]
            assert (listener["mode"], listener["starttls"], listener["auth"]) == ("starttls", "required", ["plain", "login"])
            assert data["router"]["url"] == "http://127.0.0.1:20005/auth"
            assert data["tls"] == {"cert": str(chain), "key": str(key), "min_version": "1.2"}


# The command's refusals.


def test_no_mail_or_stream_block_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text("events {}\nhttp { server { listen 80; } }\n")
    code, out, errors = run(capsys, str(config))
    assert (code, out) == (1, "")
    assert errors == [f"mailrelay from-nginx: {config}: no mail {{}} or stream {{}} block: nothing to translate"]
    config.write_text("")
    assert run(capsys, str(config))[0] == 1


def test_a_missing_file_is_named_without_a_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nginx.conf"
    code, out, errors = run(capsys, str(missing))
    assert (code, out) == (1, "")
    assert errors == [f"mailrelay from-nginx: {missing}: cannot read: no such file or directory"]


def test_the_output_ends_with_a_newline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(DATA / "stream_core.conf"))
    assert code == 0 and out.endswith("\n") and not out.endswith("\n\n")


def test_nothing_translatable_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text("stream {\n  server { listen 53 udp; proxy_pass 127.0.0.1:53; }\n}\n")
    code, out, errors = run(capsys, str(config))
    assert (code, out) == (1, "")
    assert errors[0] == f"{config}:2: listen: UDP has no equivalent (mailrelay proxies TCP): no listener"
    assert "no server could be translated" in errors[-1]


def test_parse_error_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mail.conf").write_text('mail {\n  server {\n    listen 25;\n    server_name "unclosed;\n')
    config = tmp_path / "nginx.conf"
    config.write_text("events {}\ninclude mail.conf;\n")
    code, out, errors = run(capsys, str(config))
    assert (code, out) == (1, "")
    assert errors == [f"mailrelay from-nginx: {tmp_path / 'mail.conf'}:4: unexpected end of file, expecting the closing quote"]


def test_stdout_when_no_output_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(DATA / "stream_upstream.conf"))
    assert code == 0
    assert tomllib.loads(out)["listener"][0]["listen"] == "tcp:12346"
    assert f"\n# {DATA / 'stream_upstream.conf'}:17 server {{ listen 12346; }}\n[[listener]]\n" in out


# The parser.


def test_quotes_escapes_comments_and_lines() -> None:
    text = 'a "x y" \'q\\\'s\' b\\;c;  # comment ; {\nblock {\n  inner "tab\\there" $v${w}x;\n}\n'
    (first, block) = parse_text(text, "t.conf")
    # A backslash before a character that is not a quote, a backslash, t, r or n stays (nginx's rule).
    assert (first.name, first.args, first.line) == ("a", ("x y", "q's", "b\\;c"), 1)
    assert block.block is not None
    (inner,) = block.block
    assert (inner.name, inner.args, inner.line, inner.where) == ("inner", ("tab\there", "$v${w}x"), 3, "t.conf:3")


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("a {\n b;\n", 2, 'unexpected end of file, expecting "}" (the block opened on line 1)'),
        ("a;\n}\n", 2, 'unexpected "}"'),
        ("a b\n", 1, 'unexpected end of file: "a" is not terminated by ";"'),
        ("a {\n b c }\n", 2, 'unexpected "}": "b" is not terminated by ";"'),
        (";\n", 1, 'unexpected ";"'),
        ('a "x"y;', 1, 'unexpected "y" after a quoted string'),
    ],
)
def test_syntax_errors(text: str, line: int, reason: str) -> None:
    with pytest.raises(NginxSyntaxError) as raised:
        parse_text(text, "t.conf")
    assert (raised.value.line, raised.value.reason, str(raised.value)) == (line, reason, f"t.conf:{line}: {reason}")


def test_includes_relative_to_the_prefix_globs_sorted_and_cycles(tmp_path: Path) -> None:
    (tmp_path / "sites").mkdir()
    (tmp_path / "sites" / "b.conf").write_text("second;\n")
    (tmp_path / "sites" / "a.conf").write_text("\nfirst;\n")
    (tmp_path / "nested").mkdir()
    # Relative to nginx's prefix (the main file's folder), not to the including file.
    (tmp_path / "nested" / "inner.conf").write_text("include sites/*.conf;\n")
    main_file = tmp_path / "nginx.conf"
    main_file.write_text("stream {\n include nested/inner.conf;\n include none/*.conf;\n}\n")
    (stream,) = parse_file(str(main_file))
    assert stream.block is not None
    assert [(d.name, Path(d.file).name, d.line) for d in stream.block] == [("first", "a.conf", 2), ("second", "b.conf", 1)]
    main_file.write_text("include missing.conf;\n")
    with pytest.raises(NginxSyntaxError, match=r"nginx.conf:1: include \"missing.conf\""):
        parse_file(str(main_file))
    main_file.write_text("include nginx.conf;\n")
    with pytest.raises(NginxSyntaxError, match="include cycle"):
        parse_file(str(main_file))


def test_directive_text_round_trips() -> None:
    (directive,) = parse_text('x "a b" c;', "t.conf")
    assert isinstance(directive, Directive)
    assert directive.text() == 'x "a b" c;'
    assert parse_text(directive.text(), "t.conf")[0].args == directive.args


def test_mx_with_starttls_only_is_stricter_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(
        "mail {\n auth_http 127.0.0.1:9000/auth;\n server {\n  listen 25;\n  smtp_auth none;\n  starttls only;\n }\n}\n"
    )
    data, errors, out = translated(capsys, config, tmp_path)
    (listener,) = data["listener"]
    assert (listener["auth"], listener["starttls"]) == (["none"], "required")
    assert any(line.startswith(f"{config}:6: starttls: ") and "MAIL and RCPT before STARTTLS" in line for line in errors)
    assert_every_directive_accounted(config, errors)
    assert_checks(out, capsys)


def test_unknown_directives_are_warned_and_verbose_lists_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(
        "http { server { listen 80; } }\n"
        "mail {\n auth_http 127.0.0.1:9000/auth;\n frobnicate on;\n"
        " server { listen 993 ssl; protocol imap; proxy on; }\n"
        " server { listen 110 udp; protocol pop3; }\n}\n"
    )
    code, _, errors = run(capsys, str(config), "-v", "-o", str(tmp_path / "out.toml"))
    assert code == 0
    assert f"{config}:4: frobnicate: not a mail directive from-nginx knows: not translated" in errors
    assert f"{config}:5: proxy: (ignored) nginx never reads it either" in errors
    assert f"{config}:1: http: (ignored) not part of a mail {{}} or stream {{}} block" in errors
    assert (
        f"{config}:3: auth_http: (mapped) " + 'router = { type = "http", url = ... }: the same auth service, asked the same way'
        in errors
    )
    assert_every_directive_accounted(config, [e for e in errors if "(mapped)" not in e and "(ignored)" not in e])


@pytest.mark.parametrize(
    ("listen", "endpoint", "warned"),
    [
        ("993", "tcp:993", None),
        ("*:993", "tcp:993", None),
        ("127.0.0.1:993 backlog=1024", "tcp:993:interface=127.0.0.1:backlog=1024", None),
        ("[::1]:993", "tcp6:993:interface=\\:\\:1", None),
        ("localhost:993", "tcp:993:interface=localhost", "the first address the name resolves to"),
        ("unix:/run/mail.sock", "unix:/run/mail.sock", "UNIX socket have no address"),
        ("993 reuseport rcvbuf=64k", "tcp:993", "reuseport: mailrelay's workers share one listening socket"),
    ],
)
def test_listen_forms(listen: str, endpoint: str, warned: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "nginx.conf"
    config.write_text(f"stream {{\n server {{\n  listen {listen};\n  proxy_pass 127.0.0.1:25;\n }}\n}}\n")
    data, errors, out = translated(capsys, config, tmp_path)
    assert data["listener"][0]["listen"] == endpoint
    listen_lines = [line for line in errors if line.startswith(f"{config}:3: listen: ")]
    if warned is None:
        assert listen_lines == []
    else:
        assert len(listen_lines) == 1 and warned in listen_lines[0]
    assert_every_directive_accounted(config, errors)
