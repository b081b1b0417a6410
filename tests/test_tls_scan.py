"""
A TLS scan of a running mailrelay by sslyze: an SMTPS (`tls`) listener and the STARTTLS
of an SMTP, an IMAP and a POP3 listener, each scanned as a client on the Internet would
scan it, and held to the policy `mailrelay/tls.py` sets for every listener that
terminates TLS: TLS 1.2 and 1.3 only (`min_version` "1.2"), forward-secret AEAD suites
only (`MODERN_CIPHERS`, Mozilla's "intermediate"), no compression, no renegotiation
(`OP_NO_COMPRESSION`, `OP_NO_RENEGOTIATION`), the configured chain served, and none of
the classic OpenSSL findings (Heartbleed, CCS injection, ROBOT).

sslyze lives in a virtual environment of its own, `.venv-sslyze`, which `dev/test`
creates: it pins a `cryptography` older than the one pyOpenSSL and service-identity
need, so it cannot share the project's `.venv`. It runs as a subprocess (its own
OpenSSL, nassl's, speaks SSL 2 and 3 and the suites nobody else offers any more) and is
read through its JSON output.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from mailrelay.tls import MODERN_CIPHERS
from tests.support.frontends import Router
from tests.support.net import ProxyTestCase, closed_port
from tests.support.pki import PKI

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SSLYZE_VENV = REPO / ".venv-sslyze"
SSLYZE = SSLYZE_VENV / "bin" / "python"
NAME = "relay.test"
"""The default certificate's name (ECDSA key)."""
RSA_NAME = "rsa.relay.test"
"""An SNI certificate's name (RSA key): the RSA suites, DHE and ROBOT get scanned too."""
SCAN_TIMEOUT = 300
"""Hang guard for one sslyze run (one takes a few seconds), never a timing assertion."""

# Only what the assertions read: without `--mozilla_config=disable` sslyze queues every
# plugin and judges the chain against the public trust stores.
PLUGINS = (
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--compression",
    "--reneg",
    "--certinfo",
    "--heartbleed",
    "--openssl_ccs",
    "--robot",
    "--fallback",
    "--elliptic_curves",
)
REFUSED_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")
# Forward secret (ECDHE, DHE) with an AEAD cipher (GCM, ChaCha20-Poly1305): no RSA key
# exchange, no CBC, RC4, 3DES, NULL, EXPORT or anonymous suite can match.
TLS_1_2_SUITE = re.compile(r"TLS_(ECDHE|DHE)_(ECDSA|RSA)_WITH_(AES_128_GCM_SHA256|AES_256_GCM_SHA384|CHACHA20_POLY1305_SHA256)")
# TLS 1.3's suites are all forward secret AEAD; CCM_8's short tag is the one to refuse.
TLS_1_3_SUITES = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_CCM_SHA256"}
STRONG_CURVES = {"X25519", "X448", "secp256r1", "secp384r1", "secp521r1", "brainpoolP256r1", "brainpoolP384r1", "brainpoolP512r1"}
NOT_VULNERABLE_TO_ROBOT = {"NOT_VULNERABLE_NO_ORACLE", "NOT_VULNERABLE_RSA_NOT_SUPPORTED"}


def sslyze(port: int, server_name: str, starttls: str | None, out: str) -> dict[str, Any]:
    """sslyze's scan result for 127.0.0.1:`port`, asked for `server_name` (the SNI)."""
    command = [str(SSLYZE), "-m", "sslyze", "--quiet", "--mozilla_config=disable", f"--json_out={out}", *PLUGINS]
    if starttls is not None:
        command.append(f"--starttls={starttls}")
    # host:port{ip}: connect to the ip, and use host for SNI and name checks.
    command.append(f"{server_name}:{port}{{127.0.0.1}}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=SCAN_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"sslyze exited with {done.returncode}:\n{done.stdout}{done.stderr}"
    with open(out) as f:
        [result] = json.load(f)["server_scan_results"]
    assert result["scan_status"] == "COMPLETED", f"sslyze could not scan: {result['connectivity_error_trace']}"
    scanned: dict[str, Any] = result["scan_result"]
    for plugin, outcome in scanned.items():
        if outcome["status"] != "NOT_SCHEDULED":
            assert outcome["status"] == "COMPLETED", (
                f"sslyze's {plugin} failed: {outcome['error_reason']}\n{outcome['error_trace']}"
            )
    scanned["network_configuration"] = result["network_configuration"]
    return scanned


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 fingerprint the way sslyze's JSON writes it (base64)."""
    return base64.b64encode(certificate.fingerprint(hashes.SHA256())).decode("ascii")


def suites(scan: dict[str, Any], version: str) -> list[dict[str, Any]]:
    """The suites accepted in `version` ("tls_1_2"), each with its ephemeral key."""
    return list(scan[f"{version}_cipher_suites"]["result"]["accepted_cipher_suites"])


class TLSScanTests(ProxyTestCase):
    """mailrelay with the default `[tls]` policy and a certificate chain from the test
    PKI (leaf, intermediate, root), one listener per test, scanned by sslyze."""

    def setUp(self) -> None:
        super().setUp()
        # The same test as dev/test's, which installs sslyze when this is missing.
        if not (SSLYZE_VENV / "bin" / "sslyze").exists():
            self.fail(f"sslyze is not installed in {SSLYZE_VENV}: run dev/test, which creates it")
        self.pki = PKI(self)
        intermediate = self.pki.ca.create_child_ca()
        self.intermediate = x509.load_pem_x509_certificate(intermediate.cert_pem.bytes())
        self.ecdsa = self.pki.issue("relay", NAME, ca=intermediate)
        rsa = intermediate.issue_cert(RSA_NAME, key_type=trustme.KeyType.RSA)
        self.rsa_cert, self.rsa_key = self.pki.path("rsa.crt"), self.pki.path("rsa.key")
        for blob in rsa.cert_chain_pems:
            blob.write_to_path(self.rsa_cert, append=True)
        rsa.private_key_pem.write_to_path(self.rsa_key)
        self.leaves = {NAME: self.ecdsa.x509, RSA_NAME: x509.load_pem_x509_certificate(rsa.cert_chain_pems[0].bytes())}

    async def scan(self, mode: str, protocol: str, server_name: str = NAME) -> dict[str, Any]:
        """Start a `mode` listener of `protocol` (nothing else configured in `[tls]` but the
        certificates) and scan it, through STARTTLS in `starttls` mode."""
        config = {
            "drain_timeout": 1,
            "tls": {
                "cert": self.ecdsa.cert,
                "key": self.ecdsa.key,
                "sni": [{"cert": self.rsa_cert, "key": self.rsa_key}],
            },
            "listener": [
                {
                    "name": protocol,
                    "listen": "tcp:0:interface=127.0.0.1",
                    "mode": mode,
                    "protocol": protocol,
                    "hostname": NAME,
                    # sslyze opens several hundred connections a minute: the scanner is
                    # let past the per-client limits, as a monitoring host would be.
                    "connection_limits": {"exempt": ["127.0.0.1"]},
                }
            ],
        }
        # Nobody logs in: the router is never asked.
        _, port = await self.start_proxy(config, router=Router(closed_port()))
        starttls = protocol if mode == "starttls" else None
        scan: dict[str, Any] = await self.in_thread(sslyze, port, server_name, starttls, os.path.join(self.pki.dir, "scan.json"))
        self.assertEqual(scan["network_configuration"]["tls_opportunistic_encryption"], starttls and starttls.upper())
        return scan

    def assert_policy(self, scan: dict[str, Any], server_name: str = NAME) -> None:
        """Everything the scan must show of mailrelay's TLS policy and certificates."""
        # Nothing below TLS 1.2; 1.2 and 1.3 spoken.
        for version in REFUSED_VERSIONS:
            accepted = [suite["cipher_suite"]["name"] for suite in suites(scan, version)]
            self.assertEqual(accepted, [], f"{version} accepted")
        for version in ("tls_1_2", "tls_1_3"):
            self.assertTrue(scan[f"{version}_cipher_suites"]["result"]["is_tls_version_supported"], f"{version} refused")

        # TLS 1.2: only the configured policy, and that policy forward secret AEAD.
        accepted_1_2 = suites(scan, "tls_1_2")
        self.assertTrue(accepted_1_2, "no TLS 1.2 suite accepted")
        policy = set(MODERN_CIPHERS.split(":"))
        for suite in accepted_1_2:
            cipher, key = suite["cipher_suite"], suite["ephemeral_key"]
            self.assertIn(cipher["openssl_name"], policy, f"TLS 1.2 suite outside MODERN_CIPHERS: {cipher}")
            self.assertRegex(cipher["name"], TLS_1_2_SUITE, f"TLS 1.2 suite not forward secret AEAD: {cipher}")
            self.assertFalse(cipher["is_anonymous"], cipher)
            self.assertIsNotNone(key, f"no ephemeral key exchange: {cipher}")
            minimum = {"ECDH": 253, "DH": 2048}[key["type_name"]]  # X25519 counts as 253 bits
            self.assertGreaterEqual(key["size"], minimum, f"weak key exchange for {cipher['name']}: {key}")
        accepted_1_3 = {suite["cipher_suite"]["name"] for suite in suites(scan, "tls_1_3")}
        self.assertTrue(accepted_1_3, "no TLS 1.3 suite accepted")
        self.assertLessEqual(accepted_1_3, TLS_1_3_SUITES)
        curves = {curve["name"] for curve in scan["elliptic_curves"]["result"]["supported_curves"]}
        self.assertLessEqual(curves, STRONG_CURVES)

        # No compression (CRIME), no renegotiation by the client (and the secure kind
        # advertised, RFC 5746), no downgrade below the best common version (SCSV).
        self.assertFalse(scan["tls_compression"]["result"]["supports_compression"])
        renegotiation = scan["session_renegotiation"]["result"]
        self.assertEqual(
            (
                renegotiation["is_vulnerable_to_client_renegotiation_dos"],
                renegotiation["client_renegotiations_success_count"],
                renegotiation["supports_secure_renegotiation"],
            ),
            (False, 0, True),
        )
        self.assertTrue(scan["tls_fallback_scsv"]["result"]["supports_fallback_scsv"])

        # The configured chain: leaf then intermediate, as the cert file has them. (Not
        # sslyze's path validation: it refuses trustme's leaves, whose subjectAltName is
        # critical beside a non-empty subject.)
        info = scan["certificate_info"]["result"]
        self.assertEqual(info["hostname_used_for_server_name_indication"], server_name)
        [deployment] = info["certificate_deployments"]
        served = [certificate["fingerprint_sha256"] for certificate in deployment["received_certificate_chain"]]
        self.assertEqual(served, [fingerprint(self.leaves[server_name]), fingerprint(self.intermediate)])
        self.assertTrue(deployment["received_chain_has_valid_order"])

        # The classic OpenSSL findings.
        self.assertFalse(scan["heartbleed"]["result"]["is_vulnerable_to_heartbleed"])
        self.assertFalse(scan["openssl_ccs_injection"]["result"]["is_vulnerable_to_ccs_injection"])
        self.assertIn(scan["robot"]["result"]["robot_result"], NOT_VULNERABLE_TO_ROBOT)

    async def test_an_smtps_listener_meets_the_tls_policy(self) -> None:
        self.assert_policy(await self.scan("tls", "smtp"))

    async def test_an_smtps_listener_meets_the_tls_policy_with_an_rsa_certificate_by_sni(self) -> None:
        scan = await self.scan("tls", "smtp", server_name=RSA_NAME)
        self.assert_policy(scan, server_name=RSA_NAME)
        accepted = {suite["cipher_suite"]["name"] for suite in suites(scan, "tls_1_2")}
        self.assertTrue(all("_RSA_" in name for name in accepted), accepted)

    async def test_smtp_starttls_meets_the_tls_policy(self) -> None:
        self.assert_policy(await self.scan("starttls", "smtp"))

    async def test_imap_starttls_meets_the_tls_policy(self) -> None:
        self.assert_policy(await self.scan("starttls", "imap"))

    async def test_pop3_starttls_meets_the_tls_policy(self) -> None:
        self.assert_policy(await self.scan("starttls", "pop3"))
