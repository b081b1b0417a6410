"""
`[redis] url`: where the fleet's shared store is, parsed without I/O.

`redis://[[user]:password@]host[:port][/db]` (port 6379, db 0 by default; IPv6 hosts
in brackets) or `unix:/path/to/redis.sock` (`unix:///path`, `?db=N`, and a password
as `unix://:password@/path`). A password never appears in `describe()`, in a repr or
in an error message: a configuration check or a log line may be read by anyone.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

import attrs

__all__ = ["RedisAddress", "parse_redis_url"]


@attrs.frozen
class RedisAddress:
    """Where a Redis server listens, and how to log in to it."""

    host: str | None
    """None: a UNIX socket at `path`."""
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = attrs.field(default=None, repr=False)
    password: str | None = attrs.field(default=None, repr=False)

    def describe(self) -> str:
        """Where it is, for logs and `check`: never the password."""
        where = f"unix:{self.path}" if self.host is None else (f"[{self.host}]" if ":" in self.host else self.host)
        if self.host is not None:
            where += f":{self.port}"
        login = " (with a password)" if self.password is not None else ""
        return f"{where} db {self.db}{login}"


def parse_redis_url(url: str) -> RedisAddress:
    """The address `url` names; ValueError (whose message holds no password) otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("is not a redis:// or unix: URL (a port that is not a number?)") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if parts.scheme == "redis":
        if not parts.hostname:
            raise ValueError("names no host (redis://host:port/db)")
        if parts.query or parts.fragment:
            raise ValueError("may not have a query or fragment (redis://host:port/db)")
        return RedisAddress(
            host=parts.hostname,
            port=port if port is not None else 6379,
            db=_db(parts.path.lstrip("/") or "0"),
            username=username,
            password=password,
        )
    if parts.scheme == "unix":
        if parts.hostname or port is not None:
            raise ValueError("a unix: URL names a socket path, not a host (unix:/run/redis/redis.sock)")
        if not parts.path.startswith("/"):
            raise ValueError("names no absolute socket path (unix:/run/redis/redis.sock)")
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
        unknown = sorted(set(query) - {"db"})
        if unknown:
            raise ValueError(f"has unknown parameters: {', '.join(unknown)} (only db)")
        db = _db(query["db"][-1]) if "db" in query else 0
        return RedisAddress(host=None, path=parts.path, db=db, username=username, password=password)
    if parts.scheme == "rediss":
        raise ValueError("rediss:// (Redis over TLS) is not supported: use a local Redis or a TLS tunnel")
    raise ValueError("must start with redis:// or unix:")


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 1_000_000:
        raise ValueError(f"has a database number that is not a number: {text[:20]!r}")
    return int(text)
