"""
The auth service's address: `url` checked once when the configuration is read, and shown
in messages without what may be secret in it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs
from twisted.internet.abstract import isIPv6Address

from ..logtext import loggable
from .http_answer import valid_host, valid_port


@attrs.frozen
class AuthURL:
    """A checked `url`: what to connect to and what to call it in messages."""

    url: str
    scheme: str
    host: str
    """As written, without IPv6 brackets."""
    port: int

    @property
    def host_header(self) -> str:
        """What nginx sends as `Host`: the host without the port."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def display(self) -> str:
        """The URL for messages (`display_url()`)."""
        return display_url(self.url)


def display_url(url: str) -> str:
    """
    `url` as a message may show it, whatever it holds (a malformed one too): the
    password of its user information is `...` (`http://user:...@host/`), a query string
    or fragment (which may hold a key) is `?...` / `#...`, control characters are
    escaped. Every message about a configured URL shows it through this.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # The authority is taken up to the first `/` only: a password may hold `?` or `#`.
    slash = rest.find("/")
    authority, path = (rest[:slash], rest[slash:]) if slash >= 0 else (rest, "")
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if any(c in user for c in "?#"):
            user = "..."
        elif colon:
            user += ":..."
        authority = f"{user}@{host}"
    rest = authority + path
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut] + rest[cut] + "..."
    return loggable(scheme + sep + rest, 500)


def parse_url(url: str) -> AuthURL:
    """Check an auth service URL; ValueError says what is wrong with it (showing the URL
    through `display_url()`: no password, no query string)."""
    shown = display_url(url)
    if not url.isascii() or any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError(f'must be ASCII without spaces (percent-encode the path, a host name in its xn-- form), not "{shown}"')
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:  # "Invalid IPv6 URL", and other things urlsplit cannot split
        raise ValueError(f'is not a valid URL: "{shown}"') from None
    if parts.scheme.lower() not in ("http", "https") or not url.lower().startswith(parts.scheme.lower() + "://"):
        raise ValueError(f'must be an http:// or https:// URL, not "{shown}"')
    if "@" in netloc:
        raise ValueError("must not hold a user name or password (send credentials with headers)")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f'must not have a #fragment: "{shown}"')
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        if not isIPv6Address(host):
            raise ValueError(f'has an invalid IPv6 address: "{shown}"')
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(f'has an invalid host: "{shown}"')
    else:
        host, sep, port_text_or_empty = netloc.partition(":")
        port_text = port_text_or_empty if sep else None
        if not host:
            raise ValueError(f'has no host: "{shown}"')
        if valid_host(host) is None:
            raise ValueError(f'has an invalid host "{loggable(host)}"')
    default = 443 if parts.scheme.lower() == "https" else 80
    port = default if port_text is None else valid_port(port_text)
    if port is None:
        raise ValueError(f'has an invalid port (1 to 65535): "{shown}"')
    return AuthURL(url=url, scheme=parts.scheme.lower(), host=host, port=port)
