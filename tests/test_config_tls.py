"""
`[tls]`, `[upstream] ca` and the TLS listener keys: each mistake gets its own message
naming the file, key and reason, from `load_config`, from building the service, and
from `python -m mailrelay check`.
"""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.testing import MemoryReactor

from mailrelay.config import ConfigError, load_config
from mailrelay.service import MailrelayService
from tests.support.processes import run_check

ROUTER = '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\n\n'


def listener(mode: str = "tls", **keys: object) -> str:
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"').replace("True", "true").replace("False", "false") for k, v in keys.items())
    return f'[[listener]]\nname = "l"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "{mode}"\n{extra}\n'


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of PEM files: good, mismatched, encrypted, nameless, garbage."""
    folder = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    good = ca.issue_cert("mail.test")
    good.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    good.private_key_pem.write_to_path(str(folder / "key.pem"))
    good.private_key_and_cert_chain_pem.write_to_path(str(folder / "combined.pem"))
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(folder / "other-key.pem"))
    key = serialization.load_pem_private_key(good.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (folder / "encrypted-key.pem").write_bytes(encrypted)
    (folder / "garbage.pem").write_text("this is not PEM\n")
    nameless_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no SAN here")])
    now = datetime.datetime.now(datetime.UTC)
    nameless = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(nameless_key.public_key())
        .serial_number(7)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(nameless_key, hashes.SHA256())
    )
    (folder / "nameless.pem").write_bytes(
        nameless.public_bytes(serialization.Encoding.PEM)
        + nameless_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder


def write(folder: Path, text: str) -> Path:
    path = folder / "mailrelay.toml"
    path.write_text(textwrap.dedent(text))
    return path


def load_errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


def build_errors(path: Path) -> list[str]:
    config = load_config(path)
    with pytest.raises(ConfigError) as caught:
        MailrelayService(config, reactor=MemoryReactor())
    return caught.value.errors


LOAD_CASES = [
    ("tls-without-cert", '[tls]\nkey = "key.pem"\n', ["tls.cert: is required"]),
    (
        "min-version",
        '[tls]\ncert = "cert.pem"\nmin_version = "1.4"\n',
        ['tls.min_version: must be one of "1.0", "1.1", "1.2", "1.3", not "1.4"'],
    ),
    (
        "client-cert-without-ca",
        '[tls]\ncert = "cert.pem"\nclient_cert = "required"\n',
        ["tls.client_cert: needs client_ca, the CA file client certificates are verified against"],
    ),
    (
        "client-cert-choice",
        '[tls]\ncert = "cert.pem"\nclient_ca = "ca.pem"\nclient_cert = "maybe"\n',
        ['tls.client_cert: must be one of "optional", "required", not "maybe"'],
    ),
    (
        "sni-bad-name",
        '[tls]\ncert = "cert.pem"\n[[tls.sni]]\ncert = "cert.pem"\nnames = ["mail.test", "bad name!", "*.*.x"]\n',
        [
            'tls.sni[0].names: "bad name!" is not a host name or a *.wildcard one',
            'tls.sni[0].names: "*.*.x" is not a host name or a *.wildcard one',
        ],
    ),
    (
        "sni-names-wrong-type",
        '[tls]\ncert = "cert.pem"\n[[tls.sni]]\ncert = "cert.pem"\nnames = ["mail.test", 3]\n',
        ["tls.sni[0].names: must hold only strings, not an integer (3)"],
    ),
    ("sni-without-cert", '[tls]\ncert = "cert.pem"\n[[tls.sni]]\nnames = "mail.test"\n', ["tls.sni[0].cert: is required"]),
    (
        "sni-unknown-key",
        '[tls]\ncert = "cert.pem"\n[[tls.sni]]\ncert = "cert.pem"\nhostnames = ["x.test"]\n',
        ["tls.sni[0].hostnames: unknown key"],
    ),
    (
        "sni-name-and-names",
        '[tls]\ncert = "cert.pem"\n[[tls.sni]]\ncert = "cert.pem"\nname = "x.test"\nnames = ["y.test"]\n',
        ['tls.sni[0].name: and "names" cannot both be set: list every name in names = [...]'],
    ),
    (
        "sni-bad-single-name",
        '[tls]\ncert = "cert.pem"\n[[tls.sni]]\ncert = "cert.pem"\nname = "bad name!"\n',
        ['tls.sni[0].name: "bad name!" is not a host name or a *.wildcard one'],
    ),
    (
        "sni-name-wrong-type",
        '[tls]\ncert = "cert.pem"\n[[tls.sni]]\ncert = "cert.pem"\nname = ["x.test"]\n',
        ["tls.sni[0].name: must be a string, not an array (['x.test'])"],
    ),
    ("tls-unknown-key", '[tls]\ncert = "cert.pem"\nprotocols = ["TLSv1.2"]\n', ["tls.protocols: unknown key"]),
    ("empty-file-name", '[tls]\ncert = ""\n', ["tls.cert: must name a file, not be empty"]),
]


@pytest.mark.parametrize("tls, expected", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])
def test_tls_table_errors(pems: Path, tls: str, expected: list[str]) -> None:
    path = write(pems, tls + ROUTER + listener())
    assert load_errors(path) == [f"{path}: {line}" for line in expected]


@pytest.mark.parametrize(
    "names",
    ['name = "Mail.Other.Test."', 'names = ["mail.other.test"]', 'names = "mail.other.test"'],
    ids=["name", "names", "names-as-one-string"],
)
def test_an_sni_certificate_takes_name_or_names(pems: Path, names: str) -> None:
    """docs/SPEC.md once showed `name = "..."`: it means what `names = [...]` does."""
    path = write(pems, f'[tls]\ncert = "combined.pem"\n[[tls.sni]]\ncert = "combined.pem"\n{names}\n' + ROUTER + listener())
    config = load_config(path)
    assert config.tls is not None
    [sni] = config.tls.sni
    assert sni.names == ("mail.other.test",)
    MailrelayService(config, reactor=MemoryReactor())  # builds: the certificate loads for that name


def test_the_documentation_shows_names_for_sni_certificates() -> None:
    root = Path(__file__).parent.parent
    spec, readme = ((root / document).read_text() for document in ("docs/SPEC.md", "README.md"))
    assert "[[tls.sni]] name =" not in spec
    assert '# [[tls.sni]] names = ["mail.other.org"], cert = ..., key = ...' in spec
    assert '# names = ["mail.other.org", "*.other.org"]' in readme


LISTENER_CASES = [
    (
        "handshake-timeout-on-splice",
        listener("splice", handshake_timeout=5),
        'listener[0].handshake_timeout: applies only to mode "tls" and "starttls" listeners, not "splice"',
    ),
    (
        "preread-on-tls",
        listener("tls", preread_sni=True),
        'listener[0].preread_sni: applies only to mode "splice" listeners, not "tls"',
    ),
    (
        "preread-timeout-on-tls",
        listener("tls", preread_timeout=2),
        'listener[0].preread_timeout: applies only to mode "splice" listeners, not "tls"',
    ),
    (
        "preread-not-boolean",
        listener("splice", preread_sni="yes"),
        "listener[0].preread_sni: must be true or false, not a string ('yes')",
    ),
    (
        "handshake-timeout-zero",
        listener("tls", handshake_timeout=0),
        "listener[0].handshake_timeout: must be a positive number of seconds, not 0",
    ),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in LISTENER_CASES], ids=[c[0] for c in LISTENER_CASES])
def test_tls_listener_key_errors(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, ROUTER + text)
    assert load_errors(path) == [f"{path}: {expected}"]


def test_file_names_are_relative_to_the_configuration(pems: Path, tmp_path: Path) -> None:
    path = write(pems, '[tls]\ncert = "cert.pem"\nkey = "key.pem"\n[upstream]\nca = "ca.pem"\n' + ROUTER + listener())
    config = load_config(path)
    assert config.tls is not None and config.tls.default is not None
    assert (config.tls.default.cert, config.tls.default.key) == (str(pems / "cert.pem"), str(pems / "key.pem"))
    assert config.upstream.ca == str(pems / "ca.pem")
    # A key defaults to the certificate's file (a combined PEM).
    combined = load_config(write(pems, '[tls]\ncert = "combined.pem"\n' + ROUTER + listener()))
    assert combined.tls is not None and combined.tls.default is not None
    assert combined.tls.default.key == str(pems / "combined.pem")
    MailrelayService(combined, reactor=MemoryReactor())


def file_cases(pems: Path) -> list[tuple[str, str, str]]:
    return [
        (
            "missing-cert",
            '[tls]\ncert = "nope.pem"\n',
            f"tls.cert: cannot read certificate {pems}/nope.pem: No such file or directory",
        ),
        (
            "garbage-cert",
            '[tls]\ncert = "garbage.pem"\nkey = "key.pem"\n',
            f"tls.cert: {pems}/garbage.pem holds no PEM certificate",
        ),
        (
            "garbage-key",
            '[tls]\ncert = "cert.pem"\nkey = "garbage.pem"\n',
            f"tls.key: {pems}/garbage.pem holds no usable PEM private key",
        ),
        (
            "key-mismatch",
            '[tls]\ncert = "cert.pem"\nkey = "other-key.pem"\n',
            f"tls.key: the key in {pems}/other-key.pem does not belong to the certificate in {pems}/cert.pem",
        ),
        (
            "encrypted-key",
            '[tls]\ncert = "cert.pem"\nkey = "encrypted-key.pem"\n',
            f"tls.key: the key in {pems}/encrypted-key.pem is encrypted: mailrelay needs it unencrypted",
        ),
        (
            "sni-missing-key",
            '[tls]\ncert = "combined.pem"\n[[tls.sni]]\ncert = "cert.pem"\nkey = "nope-key.pem"\n',
            f"tls.sni[0].key: cannot read key {pems}/nope-key.pem: No such file or directory",
        ),
        (
            "sni-certificate-without-names",
            '[tls]\ncert = "combined.pem"\n[[tls.sni]]\ncert = "nameless.pem"\n',
            "tls.sni[0]: the certificate names no DNS name; set names = [...]",
        ),
        (
            "client-ca-missing",
            '[tls]\ncert = "combined.pem"\nclient_ca = "nope-ca.pem"\n',
            f"tls.client_ca: cannot read CA file {pems}/nope-ca.pem: No such file or directory",
        ),
        (
            "client-ca-garbage",
            '[tls]\ncert = "combined.pem"\nclient_ca = "garbage.pem"\n',
            f"tls.client_ca: {pems}/garbage.pem holds no PEM certificate",
        ),
        (
            "upstream-ca-missing",
            '[upstream]\nca = "nope-ca.pem"\n',
            f"upstream.ca: cannot read CA file {pems}/nope-ca.pem: No such file or directory",
        ),
        ("upstream-ca-garbage", '[upstream]\nca = "garbage.pem"\n', f"upstream.ca: {pems}/garbage.pem holds no PEM certificate"),
        (
            "bad-ciphers",
            '[tls]\ncert = "combined.pem"\nciphers = "NO-SUCH-CIPHER"\n',
            "tls.ciphers: OpenSSL refuses 'NO-SUCH-CIPHER'",
        ),
    ]


FILE_CASE_IDS = [
    "missing-cert",
    "garbage-cert",
    "garbage-key",
    "key-mismatch",
    "encrypted-key",
    "sni-missing-key",
    "sni-certificate-without-names",
    "client-ca-missing",
    "client-ca-garbage",
    "upstream-ca-missing",
    "upstream-ca-garbage",
    "bad-ciphers",
]


@pytest.mark.parametrize("case", FILE_CASE_IDS)
def test_unusable_files_are_reported_before_anything_listens(pems: Path, case: str) -> None:
    [(_, text, expected)] = [c for c in file_cases(pems) if c[0] == case]
    path = write(pems, text + ROUTER + listener())
    [error] = build_errors(path)
    assert error.startswith(f"{path}: {expected}"), error


def test_certificates_are_not_read_when_no_listener_terminates_tls(pems: Path) -> None:
    # A broken [tls] matters only to listeners that use it.
    path = write(pems, '[tls]\ncert = "nope.pem"\n' + ROUTER + listener("splice"))
    MailrelayService(load_config(path), reactor=MemoryReactor())


@pytest.mark.slow
def test_check_reports_certificate_problems_and_the_tls_set_up(pems: Path) -> None:
    write(pems, '[tls]\ncert = "cert.pem"\nkey = "other-key.pem"\n' + ROUTER + listener())
    broken = run_check(pems)
    assert broken.returncode == 1
    assert f"mailrelay.toml: tls.key: the key in {pems}/other-key.pem does not belong to the certificate" in broken.stderr

    write(pems, '[tls]\ncert = "combined.pem"\nclient_ca = "ca.pem"\n' + ROUTER + listener(handshake_timeout=4))
    valid = run_check(pems)
    assert valid.returncode == 0, valid.stderr
    lines = valid.stdout.splitlines()
    assert any(
        line.startswith("tls: certificate mail.test (until ")
        and line.endswith(f"; min_version=1.2 client_cert=optional client_ca={pems}/ca.pem")
        for line in lines
    ), lines
    assert any(line.startswith('listener "l": ') and line.endswith("handshake_timeout=4s") for line in lines), lines

    write(pems, ROUTER + listener())
    self_signed = run_check(pems)
    assert self_signed.returncode == 0, self_signed.stderr
    assert "tls: SELF-SIGNED certificate " in self_signed.stdout


def test_shipped_tls_example_is_valid_but_for_its_certificate_paths() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "tls.toml"
    config = load_config(example)
    assert [(each.name, each.mode, each.preread_sni) for each in config.listeners] == [
        ("imaps", "tls", False),
        ("smtps-passthrough", "splice", True),
        ("imaps-to-tls-upstream", "tls", False),
    ]
    # Its certificates live on a production machine, not here.
    [error] = build_errors(example)
    assert error.startswith(f"{example}: tls.cert: cannot read certificate /etc/mailrelay/mail.example.org/fullchain.pem")


@pytest.mark.slow
def test_the_shipped_smtp_example_checks_and_shows_each_front_end(pems: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    text = (root / "smtp.toml").read_text()
    text = text.replace("/etc/mailrelay/mail.example.org/fullchain.pem", "cert.pem")
    text = text.replace("/etc/mailrelay/mail.example.org/privkey.pem", "key.pem")
    (pems / "smtp.toml").write_text(text)
    (pems / "routes.toml").write_bytes((root / "routes.toml").read_bytes())
    result = run_check(pems, "smtp.toml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        "  smtp: hostname=mail.example.org starttls=required auth=plain,login,cram-md5,xoauth2,oauthbearer"
        " max_attempts=3 max_errors=5 login_timeout=60s login_deadline=180s max_junk_commands=20"
    ) in lines
    assert (
        "  smtp: hostname=mx.example.org starttls=optional auth=none vet_recipients=all"
        " max_attempts=3 max_errors=5 login_timeout=60s login_deadline=180s max_junk_commands=20"
    ) in lines
    assert any(line.startswith('listener "smtps": tcp:465:backlog=1024 mode=tls protocol=smtp') for line in lines), lines


@pytest.mark.slow
def test_the_shipped_imap_example_checks_and_shows_each_front_end(pems: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    text = (root / "imap.toml").read_text()
    text = text.replace("/etc/mailrelay/mail.example.org/fullchain.pem", "cert.pem")
    text = text.replace("/etc/mailrelay/mail.example.org/privkey.pem", "key.pem")
    (pems / "imap.toml").write_text(text)
    result = run_check(pems, "imap.toml")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        "  imap: hostname=mail.example.org starttls=required auth=plain,login,xoauth2,oauthbearer"
        " max_attempts=3 max_errors=5 login_timeout=60s login_deadline=180s max_junk_commands=20"
    ) in lines
    assert (
        "  pop3: hostname=mail.example.org auth=plain,login max_attempts=3 max_errors=5 login_timeout=60s"
        " login_deadline=180s max_junk_commands=20"
    ) in lines
    assert "router: static: imap.internal.example.org:143 (tls=starttls, forward_client)" in lines
    assert [line.split(":")[0] for line in lines if line.startswith("listener")] == [
        'listener "imap"',
        'listener "imaps"',
        'listener "pop3"',
        'listener "pop3s"',
    ]
