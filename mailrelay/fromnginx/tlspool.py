"""
The `ssl_*` directives of every server that terminates TLS (mail and stream) -> the one
`[tls]` table of mailrelay.

nginx gives each server its own certificate and settings; mailrelay has one `[tls]`
for every listener, choosing a certificate by the SNI name the client asks for. So: the
first certificate is the default, each other server's certificate is an `[[tls.sni]]`
entry under its `server_name` (warned: chosen by name, not by port), and the policy
settings (`ssl_protocols`, `ssl_ciphers`, client certificates) must agree, or the
first is kept, warned.
"""

from __future__ import annotations

from typing import Any

import attrs

from .parser import Directive
from .result import Translation
from .scope import Scope

__all__ = ["TLSPool", "TLS_WARNED"]

TLS_WARNED = {
    "ssl_prefer_server_ciphers": "mailrelay's OpenSSL settings prefer the server's order already (tls_layer.py)",
    "ssl_ecdh_curve": "mailrelay uses OpenSSL's default groups",
    "ssl_dhparam": "mailrelay offers ECDHE only, no finite-field DH",
    "ssl_conf_command": "no equivalent: OpenSSL commands are not passed through",
    "ssl_session_cache": "no equivalent: mailrelay keeps OpenSSL's default session cache per process",
    "ssl_session_timeout": "no equivalent: OpenSSL's default session lifetime applies",
    "ssl_session_tickets": "no equivalent: OpenSSL's default (tickets on) applies",
    "ssl_session_ticket_key": "no equivalent: ticket keys are each process's own",
    "ssl_password_file": "no equivalent: mailrelay reads unencrypted private keys; decrypt the key file",
    "ssl_verify_depth": "no equivalent: OpenSSL's default depth applies",
    "ssl_crl": "no equivalent: client certificates are not checked against a CRL",
    "ssl_trusted_certificate": "no equivalent: the CA names sent to clients come from client_ca",
    "ssl_stapling": "no equivalent: OCSP responses are not stapled",
    "ssl_stapling_verify": "no equivalent: OCSP responses are not stapled",
    "ssl_stapling_file": "no equivalent: OCSP responses are not stapled",
    "ssl_stapling_responder": "no equivalent: OCSP responses are not stapled",
    "ssl_ocsp": "no equivalent: client certificates are not checked with OCSP",
    "ssl_ocsp_cache": "no equivalent: client certificates are not checked with OCSP",
    "ssl_ocsp_responder": "no equivalent: client certificates are not checked with OCSP",
    "ssl_early_data": "no equivalent: TLS 1.3 early data is not accepted",
    "ssl_handshake_timeout": "mapped per listener as handshake_timeout",
    "ssl_alpn": "no equivalent: mailrelay's TLS listeners offer no ALPN list",
    "ssl_certificate_cache": "no equivalent: certificates are read at start and on SIGHUP",
    "ssl_certificate_compression": "no equivalent: certificates are not compressed",
    "ssl_reject_handshake": "no equivalent: every handshake gets the default certificate",
    "ssl_key_log": "no equivalent: TLS keys are never logged",
}
"""`ssl_*` directives mailrelay has no key for, with why."""

PROTOCOL_VERSIONS = {"TLSv1": "1.0", "TLSv1.1": "1.1", "TLSv1.2": "1.2", "TLSv1.3": "1.3"}


@attrs.define
class _Server:
    where: Directive
    hostname: str | None
    cert: Directive | None
    key: Directive | None
    protocols: Directive | None
    ciphers: Directive | None
    verify: Directive | None
    client_ca: Directive | None
    nginx_tls: bool
    """Whether nginx did TLS there (a plain mail port gets STARTTLS in mailrelay)."""


@attrs.define
class TLSPool:
    """The TLS settings of every server that terminates TLS, merged at the end."""

    servers: list[_Server] = attrs.Factory(list)

    def take_unused(self, scope: Scope, t: Translation) -> None:
        """A server that terminates no TLS: its `ssl_*` directives change nothing here."""
        for name in list(scope.by_name):
            if name.startswith("ssl_") and name != "ssl_preread":
                for directive in scope.take(name):
                    t.ignored(directive, "no listen ... ssl or starttls here: nginx does not use it either")

    def add(self, server: Directive, scope: Scope, hostname: str | None, t: Translation, nginx_tls: bool) -> None:
        """A server that terminates TLS in mailrelay (`nginx_tls`: and in nginx): take
        its `ssl_*` directives."""
        certs = scope.take("ssl_certificate")
        keys = scope.take("ssl_certificate_key")
        usable = [c for c in certs if c.args and not c.args[0].startswith("data:") and "$" not in c.args[0]]
        for cert in certs:
            if cert not in usable:
                t.warn(cert, "a data: or variable certificate has no equivalent: give mailrelay a file")
        if len(usable) > 1:
            for extra in usable[1:]:
                t.warn(extra, "mailrelay serves one certificate per name: the first ssl_certificate of this server is used")
        for extra_key in keys[1:]:
            t.warn(extra_key, "mailrelay serves one certificate per name: the first ssl_certificate_key is used")
        for name in list(scope.by_name):
            if name in TLS_WARNED:
                for directive in scope.take(name):
                    if name == "ssl_handshake_timeout":
                        continue  # the caller maps it
                    t.warn(directive, TLS_WARNED[name])
        self.servers.append(
            _Server(
                where=server,
                hostname=hostname,
                cert=usable[0] if usable else None,
                key=keys[0] if keys else None,
                protocols=scope.last("ssl_protocols"),
                ciphers=scope.last("ssl_ciphers"),
                verify=scope.last("ssl_verify_client"),
                client_ca=scope.last("ssl_client_certificate"),
                nginx_tls=nginx_tls,
            )
        )

    def client_certificates(self, scope: Scope) -> bool:
        """Whether this scope verifies client certificates (auth external needs it)."""
        verify = scope.by_name.get("ssl_verify_client")
        ca = scope.by_name.get("ssl_client_certificate")
        return bool(verify and verify[-1].args[:1] in (("on",), ("optional",)) and ca)

    def finish(self, t: Translation) -> None:
        """Write `[tls]` and `[[tls.sni]]` from what the servers said."""
        if not self.servers:
            return
        with_cert = [s for s in self.servers if s.cert is not None]
        if not with_cert:
            for s in self.servers:
                t.warn(s.where, self._no_certificate(s))
            return
        default = with_cert[0]
        pairs: dict[tuple[str, str], _Server] = {}
        for s in with_cert:
            assert s.cert is not None
            key = s.key.args[0] if s.key is not None and s.key.args else s.cert.args[0]
            pairs.setdefault((s.cert.args[0], key), s)
        (cert, key), _ = next(iter(pairs.items()))
        t.tls["cert"] = cert
        if key != cert:
            t.tls["key"] = key
        t.tls_comment.append(f"{default.cert.where if default.cert else default.where.where} ssl_certificate (the default)")
        for s in with_cert:
            assert s.cert is not None
            t.mapped(s.cert, "[tls] cert (or a [[tls.sni]] cert)")
            if s.key is not None:
                t.mapped(s.key, "[tls] key (or a [[tls.sni]] key)")
        for s in self.servers:
            if s.cert is None and s.nginx_tls:
                t.warn(s.where, "this TLS server has no ssl_certificate of its own: it gets mailrelay's default certificate")
        for (pair_cert, pair_key), s in list(pairs.items())[1:]:
            if s.hostname is None:
                assert s.cert is not None
                t.warn(
                    s.cert,
                    "mailrelay chooses a certificate by the SNI name clients ask for, not by port, and this server"
                    " has no server_name: its certificate is not used (add it as [[tls.sni]] with its names)",
                )
                continue
            entry: dict[str, Any] = {"cert": pair_cert}
            if pair_key != pair_cert:
                entry["key"] = pair_key
            entry["names"] = [s.hostname]
            t.sni.append(entry)
            assert s.cert is not None
            t.warn(
                s.cert,
                f'[[tls.sni]] names = ["{s.hostname}"]: mailrelay chooses this certificate for clients asking for'
                " that name (SNI) on any TLS listener, not for this server's port; clients without SNI get the default",
            )
        self._policy(t)

    @staticmethod
    def _no_certificate(s: _Server) -> str:
        if s.nginx_tls:
            return (
                "TLS without ssl_certificate (nginx refuses to start): mailrelay will use a self-signed certificate;"
                " add [tls] cert and key"
            )
        return (
            "mailrelay offers STARTTLS on this plain port, and there is no ssl_certificate: it will use a"
            " self-signed certificate until you add [tls] cert and key"
        )

    def _policy(self, t: Translation) -> None:
        protocols = [s.protocols for s in self.servers if s.protocols is not None]
        minimums: list[tuple[str, Directive]] = []
        for directive in protocols:
            versions = [PROTOCOL_VERSIONS[a] for a in directive.args if a in PROTOCOL_VERSIONS]
            dropped = [a for a in directive.args if a not in PROTOCOL_VERSIONS]
            if not versions:
                t.warn(directive, "no TLS version mailrelay offers is listed: mailrelay's default (1.2 and later) applies")
                continue
            lowest = min(versions)
            minimums.append((lowest, directive))
            parts = [f'[tls] min_version = "{lowest}"']
            if dropped:
                parts.append(f"{' '.join(dropped)} not offered by mailrelay")
            if "1.3" not in versions:
                parts.append("mailrelay has no maximum version: TLS 1.3 is offered too")
            if lowest in ("1.0", "1.1"):
                parts.append("TLS 1.0 and 1.1 are obsolete (RFC 8996): consider 1.2")
            message = "; ".join(parts)
            if dropped or "1.3" not in versions or lowest in ("1.0", "1.1"):
                t.warn(directive, message)
            else:
                t.mapped(directive, message)
        if minimums:
            lowest = min(m for m, _ in minimums)
            t.tls["min_version"] = lowest
            for version, directive in minimums:
                if version != lowest:
                    t.warn(directive, f"[tls] is shared by every listener: min_version is {lowest}, the lowest any server allows")
        ciphers = [s.ciphers for s in self.servers if s.ciphers is not None]
        if ciphers:
            t.tls["ciphers"] = ciphers[0].args[0] if ciphers[0].args else ""
            for directive in ciphers:
                if directive.args != ciphers[0].args:
                    t.warn(directive, f"[tls] is shared by every listener: ciphers are those of {ciphers[0].where}")
                else:
                    t.mapped(directive, "[tls] ciphers (TLS 1.2 and earlier; TLS 1.3's suites are OpenSSL's)")
        self._client_certificates(t)

    def _client_certificates(self, t: Translation) -> None:
        verifying = [s for s in self.servers if s.verify is not None and s.verify.args[:1] != ("off",)]
        for s in self.servers:
            if s.verify is not None and s.verify.args[:1] == ("off",):
                t.ignored(s.verify, "off is mailrelay's default (no client_ca)")
        if not verifying:
            for s in self.servers:
                if s.client_ca is not None:
                    t.ignored(s.client_ca, "no ssl_verify_client: nginx asks for no client certificate either")
            return
        first = verifying[0]
        assert first.verify is not None
        mode = first.verify.args[0] if first.verify.args else "on"
        if mode == "optional_no_ca":
            t.warn(first.verify, "optional_no_ca has no equivalent: client certificates are verified against client_ca")
            mode = "optional"
        if first.client_ca is None:
            t.warn(first.verify, "no ssl_client_certificate: mailrelay cannot verify client certificates without client_ca")
            return
        t.tls["client_ca"] = first.client_ca.args[0]
        t.tls["client_cert"] = "required" if mode == "on" else "optional"
        t.mapped(first.verify, f'[tls] client_cert = "{t.tls["client_cert"]}"')
        t.mapped(first.client_ca, "[tls] client_ca")
        for s in verifying[1:]:
            assert s.verify is not None
            if s.verify.args != first.verify.args or (s.client_ca and s.client_ca.args) != first.client_ca.args:
                t.warn(s.verify, f"[tls] is shared by every listener: client certificates as {first.verify.where} says")
            else:
                t.mapped(s.verify, f'[tls] client_cert = "{t.tls["client_cert"]}"')
                if s.client_ca is not None:
                    t.mapped(s.client_ca, "[tls] client_ca")
        for s in self.servers:
            if s not in verifying:
                t.warn(
                    s.where,
                    "mailrelay asks every TLS client for a certificate when [tls] client_ca is set, this server's too",
                )
