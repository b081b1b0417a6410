"""
State a fleet of mailrelay processes shares through Redis (`[redis]`): the login
limits' failure counts and the route cache.

- `store`: the one Redis connection of a process, every call under a short deadline,
  and the switch to this process's own state (one warning) when Redis is down,
  erroring or slow, and back (one info line) when it answers again;
- `limits`: the failure counts and logins in flight of `guard.LoginGuard`, in Redis;
- `routes`: `cache_ttl` answers in Redis, authenticated with the fleet's secret.

Nothing here ever refuses a login because Redis is unavailable: the process then
decides with what it counted itself.
"""

from __future__ import annotations

from .limits import SharedLoginCounts
from .routes import SharedRoutes
from .store import SharedStore, StoreUnavailable, read_secret

__all__ = ["SharedLoginCounts", "SharedRoutes", "SharedStore", "StoreUnavailable", "read_secret"]
