"""
The soak run behind tests/test_soak.py and `python bench/soak.py`: many sessions through
one running mailrelay, every byte checked end to end, and the process's memory and file
descriptors watched for leaks.

What runs (all on 127.0.0.1, ephemeral ports; bench/common/ starts and stops it):

- mailrelay as its own process, `twistd -n mailrelay --config TMP/mailrelay.toml` (the
  installed package, as the benchmarks run it), with three listeners, each routed
  statically to the echo upstream:
  `splice` (mode splice: plain TCP passed through), `tls` (mode tls, protocol none:
  implicit TLS ended by mailrelay, plain TCP upstream) and `pop3s` (mode tls, protocol
  pop3: the client logs in with USER/PASS or AUTH PLAIN, mailrelay logs in upstream with
  AUTH PLAIN and splices from then on). Login and connection limits exempt loopback:
  every client here is one address opening thousands of connections a minute;
- the upstream, another process: bench/common/echo.py's `EchoProtocol` (and
  `POP3EchoProtocol` behind the POP3 login), which echoes a `SIZE\\n`-headed payload,
  then sends the SHA-256 of what it received and ends its side of the stream;
- the clients: one asyncio loop in this process with `concurrency` sessions in flight.

A session: connect (a full TLS handshake, verified, on `tls` and `pop3s`; the POP3 login
on `pop3s`), send `SIZE\\n` and SIZE bytes while reading the echo, read until the end of
stream. It passes when exactly SIZE + 65 bytes came back, the SHA-256 of the first SIZE
is the payload's, and the last 65 are the upstream's hex SHA-256 of what it received,
equal to the payload's too. The upstream reports any byte after the payload, an end of
stream before it or a reset; the run fails on any of them.

Each session's parameters come from a generator seeded with (seed, session number), so
a run is described by its seed. Payload sizes are log-uniform between 1 B and
`max_size` (median about 2 KiB, mean about max_size / ln(max_size), 275 KB for 4 MiB),
2 % are empty, and every 1000th session moves 0 B and the next one exactly `max_size`.
About 20 % of the writers are paced (pieces of 1 B to 2 KiB with pauses of up to 2 ms,
for 0.05-0.3 s), about 15 % of the readers are slow (pieces of 256 B to 16 KiB with
pauses of 1-10 ms, for 0.2-1 s: mailrelay has to hold the upstream back), and half of
the plain `splice` clients half-close after their payload (TLS clients cannot).

Leak checks: the run stops after the first `warmup` sessions until all of them have
ended and mailrelay has logged them, and measures the process's RSS (VmRSS) and open
descriptors (/proc/PID/fd) idle; it does the same at the end, and samples both along the
way (with sessions in flight: the curve). Idle against idle, nothing in flight distorts
the comparison:

- descriptors: end <= warm-up + FD_SLACK. An idle mailrelay holds its listening
  sockets, the log file and the reactor's own (13 in every run so far, after the
  warm-up and at the end alike); a session that is not cleaned up holds one or two more,
  so a leak of one session in 30,000 shows;
- RSS: end <= warm-up * RSS_FACTOR + RSS_SLACK (1.25 and 10 MiB: about 96 MiB for the
  usual 69 MiB). Sessions that clean up after themselves still grow the RSS after the
  warm-up, as the allocator reaches its high-water mark under the payload mix: +8 MiB
  in the next 3,000 sessions, then flat (splice alone: 62 -> 70 MiB at 4,000 sessions,
  70 MiB at 30,000; all three listeners with OpenSSL's session cache turned off: 69 ->
  79 MiB at 30,000), so the margin is 1.5-2x that. A leak grows with the sessions: 29,000
  of them after the warm-up make 1 KiB per session 28 MiB, past the margin; a leaked
  session (protocol objects, TLS connection, buffers: tens of kB) fails by far. 30,000
  sessions rather than the 10,000 minimum, because that is what puts a 1-3 KiB per
  session leak clearly past the margin (at 10,000 a 3 KiB one sat at the limit) while
  the run stays near 80 s.

And every session is accounted for: mailrelay logged exactly one `outcome=closed` line
per session (no other outcome, no traceback), its per-listener `up=`/`down=` byte counts
add up to what the clients sent and received, and the upstream saw one connection and
SIZE bytes per session.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import math
import os
import random
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

from mailrelay.zerocopy import PIPES_KEPT

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

# bench/common/: process hygiene, twistd, certificates, the echo upstream.
from common.echo import ECHO_TRAILER, POP3_PASSWORD, POP3_USER  # noqa: E402
from common.logs import SessionLog, read_session_log  # noqa: E402
from common.processes import Children, cpu_of_group, own_cpu  # noqa: E402
from common.targets import SERVER_NAME, Certificates  # noqa: E402
from common.twistd import start_twistd  # noqa: E402
from common.upstream import Upstream  # noqa: E402
from common.wire import HOST  # noqa: E402

LISTENERS = ("splice", "tls", "pop3s")
MiB = 1 << 20

RSS_FACTOR = 1.25
RSS_SLACK = 10 * MiB
FD_SLACK = 2

READ_CHUNK = 256 * 1024
WRITE_CHUNK = 256 * 1024
SETTLE_WAIT = 60.0
"""Hang guard for mailrelay to log sessions that have ended: never a timing assertion."""

MAILRELAY_CONFIG = """\
# written by tests/support/soak.py
drain_timeout = 1

[tls]
cert = "{chain}"
key = "{key}"

[login_limits]
exempt = ["127.0.0.0/8"]

[[listener]]
name = "splice"
listen = "tcp:0:interface=127.0.0.1:backlog=1024"
mode = "splice"
idle_timeout = {idle_timeout}
router = {{ type = "static", host = "127.0.0.1", port = {echo} }}
{limits}
[[listener]]
name = "tls"
listen = "tcp:0:interface=127.0.0.1:backlog=1024"
mode = "tls"
idle_timeout = {idle_timeout}
router = {{ type = "static", host = "127.0.0.1", port = {echo} }}
{limits}
[[listener]]
name = "pop3s"
listen = "tcp:0:interface=127.0.0.1:backlog=1024"
mode = "tls"
protocol = "pop3"
hostname = "relay.soak.example"
idle_timeout = {idle_timeout}
router = {{ type = "static", host = "127.0.0.1", port = {pop3_echo} }}
{limits}"""

CONNECTION_LIMITS = """[listener.connection_limits]
exempt = ["127.0.0.0/8"]
"""


@attrs.frozen
class SoakOptions:
    sessions: int = 30_000
    warmup: int = 1_000
    """Sessions before the baseline measurement."""
    concurrency: int = 100
    max_size: int = 4 * MiB
    seed: int = attrs.field(factory=lambda: random.randrange(1 << 32))
    samples: int = 20
    """Points of the memory curve between the start and the end."""
    session_timeout: float = 120.0
    """Hang guard per session (mailrelay's idle_timeout ends a stuck one first)."""
    idle_timeout: float = 30.0
    max_failures: int = 50
    """No new sessions are started after this many failed."""
    listeners: tuple[str, ...] = LISTENERS
    """The listeners sessions go to (all three are configured either way)."""


@attrs.frozen
class Plan:
    """One session's parameters, all drawn from its own seeded generator."""

    number: int
    listener: str
    size: int
    offset: int
    pace_for: float
    slow_for: float
    half_close: bool
    pop3_auth: str
    seed: int

    def describe(self) -> str:
        how = [f"{self.size} B", self.listener]
        if self.pace_for:
            how.append(f"paced {self.pace_for:.2f}s")
        if self.slow_for:
            how.append(f"slow reader {self.slow_for:.2f}s")
        if self.half_close:
            how.append("half-close")
        if self.listener == "pop3s":
            how.append(f"login {self.pop3_auth}")
        return f"session {self.number} ({', '.join(how)})"


POOL_SLACK = 1 * MiB


def plan(seed: int, number: int, max_size: int, listeners: tuple[str, ...] = LISTENERS) -> Plan:
    rng = random.Random(f"soak:{seed}:{number}")
    listener = rng.choice(listeners)
    if number % 1000 == 1:
        size = 0
    elif number % 1000 == 2:
        size = max_size
    elif rng.random() < 0.02:
        size = 0
    else:
        size = min(max_size, int(math.exp(rng.uniform(0, math.log(max_size + 1)))))
    return Plan(
        number=number,
        listener=listener,
        size=size,
        offset=rng.randrange(POOL_SLACK),
        pace_for=rng.uniform(0.05, 0.3) if rng.random() < 0.2 else 0.0,
        slow_for=rng.uniform(0.2, 1.0) if rng.random() < 0.15 else 0.0,
        half_close=listener == "splice" and rng.random() < 0.5,
        pop3_auth=rng.choice(("user", "plain")),
        seed=rng.getrandbits(64),
    )


class SessionFailed(Exception):
    pass


# --------------------------------------------------------------------------------------
# The process under test


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (bytes) and the number of open descriptors of a process."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(value.split()[0]) * 1024
    # Pipes apart: the zero-copy pump keeps up to PIPES_KEPT empty ones for the next
    # sessions, as many as the busiest moment left, which is not a leak.
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fds.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass  # closed since the listing: mid-run, sessions come and go
    values["pipes"] = sum(1 for target in fds if target.startswith("pipe:"))
    values["fds"] = len(fds) - values["pipes"]
    return values


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a process has used."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.define
class Sample:
    label: str
    sessions: int
    seconds: float
    in_flight: int
    rss: int
    fds: int
    """Open descriptors but pipes."""
    pipes: int


@attrs.define
class Tally:
    sessions: int = 0
    sent: int = 0
    """Bytes written after the login: head and payload."""
    received: int = 0
    payload: int = 0


@attrs.define
class SoakResult:
    options: SoakOptions
    pid: int
    log: Path
    samples: list[Sample] = attrs.field(factory=list)
    tallies: dict[str, Tally] = attrs.field(factory=lambda: {name: Tally() for name in LISTENERS})
    failures: list[str] = attrs.field(factory=list)
    sizes: list[int] = attrs.field(factory=list)
    paced: int = 0
    slow: int = 0
    half_closed: int = 0
    elapsed: float = 0.0
    cpu: dict[str, float] = attrs.field(factory=dict)
    hwm: int = 0
    session_log: SessionLog | None = None
    upstream_summary: dict[str, int] = attrs.field(factory=dict)
    upstream_problems: list[str] = attrs.field(factory=list)

    @property
    def started(self) -> int:
        return sum(t.sessions for t in self.tallies.values())

    def sample(self, label: str) -> Sample:
        return next(s for s in self.samples if s.label == label)

    def problems(self) -> list[str]:
        """Every leak and integrity check that failed, one line each."""
        found = []
        if self.failures:
            found.append(f"{len(self.failures)} sessions failed; the first: " + "; ".join(self.failures[:5]))
        if self.started != self.options.sessions:
            found.append(f"{self.started} sessions run, not {self.options.sessions}")
        log = self.session_log
        if log is None:
            found.append("mailrelay's log was not read")
        else:
            closed = log.count("closed")
            if closed != self.started:
                found.append(f"mailrelay logged {closed} sessions closed for {self.started} sessions run")
            others = {k: n for k, n in log.outcomes.items() if k[1] != "closed"}
            if others:
                found.append(f"mailrelay logged other outcomes: {others}")
            if log.problems:
                found.append(f"mailrelay's log has {len(log.problems)} tracebacks/errors, the first: {log.problems[0]}")
            for name, tally in self.tallies.items():
                up, down = log.up.get(name, 0), log.down.get(name, 0)
                if (up, down) != (tally.sent, tally.received) and not self.failures:
                    found.append(
                        f"{name}: mailrelay counted up={up} down={down}, "
                        f"the clients sent {tally.sent} and received {tally.received}"
                    )
        if self.upstream_problems:
            found.append(
                f"the upstream reported {len(self.upstream_problems)} problems: " + "; ".join(self.upstream_problems[:5])
            )
        summary = self.upstream_summary
        payload = sum(t.payload for t in self.tallies.values())
        expected = {"connections": self.started, "open": 0, "payload_bytes": payload, "problems": 0}
        if summary != expected:
            found.append(f"the upstream's summary is {summary or 'missing'}, expected {expected}")
        base, end = self.sample("warm-up"), self.sample("end")
        rss_limit = base.rss * RSS_FACTOR + RSS_SLACK
        if end.rss > rss_limit:
            found.append(
                f"RSS grew from {base.rss / MiB:.1f} MiB after {base.sessions} sessions to {end.rss / MiB:.1f} MiB "
                f"after {end.sessions} (limit {rss_limit / MiB:.1f} MiB)"
            )
        if end.fds > base.fds + FD_SLACK:
            found.append(
                f"open descriptors grew from {base.fds} after {base.sessions} sessions to {end.fds} after {end.sessions}"
            )
        if end.pipes > 2 * PIPES_KEPT:
            found.append(f"{end.pipes} pipe descriptors open at the end: more than the {PIPES_KEPT} pipes the pool keeps")
        if end.in_flight or base.in_flight:
            found.append("sessions were still in flight at a measurement")
        return found

    def report(self) -> list[str]:
        o = self.options
        payload = sum(t.payload for t in self.tallies.values())
        through = sum(t.sent + t.received for t in self.tallies.values())
        sizes = sorted(self.sizes)
        median = sizes[len(sizes) // 2] if sizes else 0
        per = ", ".join(f"{name} {t.sessions:,}" for name, t in self.tallies.items())
        rate = self.started / self.elapsed if self.elapsed else 0.0
        lines = [
            f"soak: {self.started:,} sessions ({per}) in {self.elapsed:.1f} s: {rate:.1f} sessions/s, "
            f"{concurrency_text(o)}, seed {o.seed}",
            f"payload: {payload:,} bytes each way ({payload / 1e9:.2f} GB; {through / 1e6 / max(self.elapsed, 1e-9):.1f} MB/s "
            f"client<->relay both ways), sizes 0 B to {o.max_size:,} B log-uniform: median {median:,} B, "
            f"mean {payload // max(1, len(sizes)):,} B, max {max(sizes, default=0):,} B, empty {sizes.count(0)}",
            f"pacing: {self.paced} paced writers, {self.slow} slow readers, {self.half_closed} client half-closes",
            "CPU, % of one core over the run: "
            + ", ".join(f"{k} {v:.0f}" for k, v in self.cpu.items())
            + f" ({os.cpu_count()} cores)",
            f"memory curve of mailrelay (pid {self.pid}):",
            "  point        sessions  seconds  in flight   RSS MiB    fds  pipes",
        ]
        for s in self.samples:
            lines.append(
                f"  {s.label:<11} {s.sessions:>9,} {s.seconds:8.1f} {s.in_flight:10d} {s.rss / MiB:9.1f} {s.fds:6d} {s.pipes:6d}"
            )
        if any(s.label == "warm-up" for s in self.samples) and any(s.label == "end" for s in self.samples):
            base, end = self.sample("warm-up"), self.sample("end")
            limit = (base.rss * RSS_FACTOR + RSS_SLACK) / MiB
            lines.append(
                f"RSS: {base.rss / MiB:.1f} MiB idle after {base.sessions:,} sessions, {end.rss / MiB:.1f} MiB idle at the end "
                f"(limit {RSS_FACTOR:g} x warm-up + {RSS_SLACK // MiB} MiB = {limit:.1f} MiB), "
                f"peak (VmHWM) {self.hwm / MiB:.1f} MiB"
            )
            lines.append(
                f"open descriptors but pipes: {base.fds} idle after the warm-up, {end.fds} idle at the end (limit +{FD_SLACK});"
                f" pipes {base.pipes} and {end.pipes} (limit {2 * PIPES_KEPT}: the zero-copy pool)"
            )
        if self.session_log is not None:
            log = self.session_log
            outcomes = ", ".join(f"{listener} {outcome}={n:,}" for (listener, outcome), n in sorted(log.outcomes.items()))
            lines.append(f"mailrelay log: {outcomes or 'no session lines'}; tracebacks/errors: {len(log.problems)}")
        lines.append(f"upstream: {self.upstream_summary or 'no summary'}")
        lines.append(f"failed sessions: {len(self.failures)}")
        lines += [f"  {failure}" for failure in self.failures[:10]]
        return lines


def concurrency_text(o: SoakOptions) -> str:
    return f"{o.concurrency} in flight, baseline after {o.warmup:,}"


# --------------------------------------------------------------------------------------
# The clients


@attrs.define
class Client:
    options: SoakOptions
    ports: dict[str, int]
    tls: ssl.SSLContext
    pool: bytes
    result: SoakResult
    done: int = 0
    in_flight: int = 0
    started_at: float = 0.0
    sample_every: int = 1

    async def session(self, p: Plan) -> None:
        tally = self.result.tallies[p.listener]
        tally.sessions += 1
        self.result.sizes.append(p.size)
        self.result.paced += bool(p.pace_for)
        self.result.slow += bool(p.slow_for)
        self.result.half_closed += p.half_close
        payload = memoryview(self.pool)[p.offset : p.offset + p.size]
        digest = hashlib.sha256(payload).hexdigest()
        head = b"%d\n" % p.size
        tls = None if p.listener == "splice" else self.tls
        reader, writer = await asyncio.open_connection(
            HOST, self.ports[p.listener], ssl=tls, server_hostname=SERVER_NAME if tls else None, limit=READ_CHUNK
        )
        rng = random.Random(p.seed)
        try:
            if p.listener == "pop3s":
                await pop3_login(reader, writer, p.pop3_auth)
            async with asyncio.TaskGroup() as group:
                sending = group.create_task(send(writer, head, payload, p, rng))
                receiving = group.create_task(receive(reader, p.size, p.slow_for, random.Random(p.seed + 1)))
            sent = sending.result()
            echoed, trailer, received = receiving.result()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        tally.sent += sent
        tally.received += received
        tally.payload += p.size
        expected = p.size + ECHO_TRAILER
        if received != expected:
            raise SessionFailed(f"{received} bytes came back, not {expected}")
        if echoed != digest:
            raise SessionFailed("the echo differs from the payload (SHA-256)")
        if trailer != digest.encode() + b"\n":
            raise SessionFailed(f"the upstream received something else than the payload: its SHA-256 is {trailer[:64]!r}")

    async def run_one(self, p: Plan) -> None:
        self.in_flight += 1
        try:
            async with asyncio.timeout(self.options.session_timeout):
                await self.session(p)
        except Exception as e:
            self.result.failures.append(f"{p.describe()}: {explain(e)}")
        finally:
            self.in_flight -= 1
            self.done += 1
        if self.done % self.sample_every == 0 and self.done not in (self.options.warmup, self.options.sessions):
            self.sample(f"{self.done}")

    def sample(self, label: str) -> Sample:
        status = proc_status(self.result.pid)
        seconds = time.monotonic() - self.started_at
        s = Sample(label, self.done, seconds, self.in_flight, status["VmRSS"], status["fds"], status["pipes"])
        self.result.samples.append(s)
        self.result.hwm = max(self.result.hwm, status["VmHWM"])
        return s

    async def phase(self, numbers: Iterator[int]) -> None:
        async def worker() -> None:
            for number in numbers:
                if len(self.result.failures) >= self.options.max_failures:
                    return
                await self.run_one(plan(self.options.seed, number, self.options.max_size, self.options.listeners))

        await asyncio.gather(*(worker() for _ in range(self.options.concurrency)))

    async def settle(self, sessions: int) -> SessionLog:
        """mailrelay's log once it holds a line for each of `sessions` sessions (two reads agreeing)."""
        deadline = time.monotonic() + SETTLE_WAIT
        previous = None
        while True:
            log = read_session_log([self.result.log])
            if log.count() >= sessions and previous is not None and log.outcomes == previous.outcomes:
                return log
            if time.monotonic() > deadline:
                self.result.failures.append(
                    f"mailrelay logged {log.count()} of {sessions} sessions {SETTLE_WAIT:g}s after they ended"
                )
                return log
            previous = log
            await asyncio.sleep(0.05)

    async def run(self) -> None:
        o = self.options
        self.sample_every = max(1, o.sessions // max(1, o.samples))
        cpu_before = {"mailrelay": cpu_of(self.result.pid), "clients": own_cpu()}
        self.started_at = time.monotonic()
        self.sample("start")
        warmup = min(o.warmup, o.sessions)
        await self.phase(iter(range(warmup)))
        await self.settle(warmup)
        self.sample("warm-up")
        await self.phase(iter(range(warmup, o.sessions)))
        self.result.elapsed = time.monotonic() - self.started_at
        self.result.session_log = await self.settle(self.result.started)
        self.result.cpu = {
            "mailrelay": 100 * (cpu_of(self.result.pid) - cpu_before["mailrelay"]) / self.result.elapsed,
            "clients (this process)": 100 * (own_cpu() - cpu_before["clients"]) / self.result.elapsed,
        }
        self.sample("end")


def explain(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    if isinstance(e, TimeoutError):
        return "no end after the session timeout (hung)"
    return f"{type(e).__name__}: {e}"


async def send(writer: asyncio.StreamWriter, head: bytes, payload: memoryview, p: Plan, rng: random.Random) -> int:
    """Head and payload, in paced pieces first if the plan says so; the bytes written."""
    writer.write(head)
    position = 0
    if p.pace_for:
        until = time.monotonic() + p.pace_for
        while position < len(payload) and time.monotonic() < until:
            piece = rng.randint(1, 2048)
            writer.write(payload[position : position + piece])
            position += len(payload[position : position + piece])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.002))
    while position < len(payload):
        writer.write(payload[position : position + WRITE_CHUNK])
        position += WRITE_CHUNK
        await writer.drain()
    if p.half_close:
        writer.write_eof()
    return len(head) + len(payload)


async def receive(reader: asyncio.StreamReader, size: int, slow_for: float, rng: random.Random) -> tuple[str, bytes, int]:
    """Until the end of stream: the SHA-256 of the first `size` bytes, the next ones (at
    most 4 KiB kept), and how many came in all."""
    digest = hashlib.sha256()
    trailer = bytearray()
    got = 0
    until = time.monotonic() + slow_for if slow_for else 0.0
    while True:
        slow = until and time.monotonic() < until
        data = await reader.read(rng.randint(256, 16384) if slow else READ_CHUNK)
        if not data:
            return digest.hexdigest(), bytes(trailer), got
        if got < size:
            view = memoryview(data)
            digest.update(view[: size - got])
            if len(trailer) < 4096:
                trailer += view[size - got :]
        elif len(trailer) < 4096:
            trailer += data
        got += len(data)
        if slow:
            await asyncio.sleep(rng.uniform(0.001, 0.01))


async def pop3_login(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, how: str) -> None:
    """Greeting, then USER and PASS or AUTH PLAIN; the upstream's own +OK must come back."""

    async def expect(prefix: bytes) -> bytes:
        line = await reader.readline()
        if not line.startswith(prefix):
            raise SessionFailed(f"POP3: expected {prefix!r}, got {line[:200]!r}")
        return line

    await expect(b"+OK")
    if how == "user":
        writer.write(b"USER " + POP3_USER.encode() + b"\r\n")
        await expect(b"+OK")
        writer.write(b"PASS " + POP3_PASSWORD.encode() + b"\r\n")
    else:
        response = binascii.b2a_base64(b"\0" + POP3_USER.encode() + b"\0" + POP3_PASSWORD.encode(), newline=False)
        writer.write(b"AUTH PLAIN " + response + b"\r\n")
    await expect(b"+OK soak upstream: logged in")


# --------------------------------------------------------------------------------------
# The whole run


def run_soak(options: SoakOptions, children: Children, workdir: Path) -> SoakResult:
    """Start the upstream and mailrelay, run the sessions, stop the upstream; `children`
    holds every process started (the caller stops them, whatever happens)."""
    certs = Certificates(workdir)
    upstream_err = workdir / "upstream.err"
    with open(upstream_err, "wb") as err:
        upstream = Upstream(children, 1, echo=True, stderr=err)
    config = MAILRELAY_CONFIG.format(
        chain=certs.chain,
        key=certs.key,
        echo=upstream.echo,
        pop3_echo=upstream.pop3_echo,
        idle_timeout=options.idle_timeout,
        limits=CONNECTION_LIMITS,
    )
    proc, ports, log, _ = start_twistd(children, workdir, "mailrelay", config, len(LISTENERS))
    result = SoakResult(options, proc.pid, log)
    pool = random.Random(f"soak-pool:{options.seed}").randbytes(options.max_size + POOL_SLACK)
    client = Client(options, ports, certs.dial.context(), pool, result)
    upstream_cpu = cpu_of_group(upstream.proc.pid)
    asyncio.run(client.run())
    result.cpu["upstream"] = 100 * (cpu_of_group(upstream.proc.pid) - upstream_cpu) / max(result.elapsed, 1e-9)
    # The upstream writes its summary once its connections have ended and its stdin closed.
    assert upstream.proc.stdin is not None
    upstream.proc.stdin.close()
    try:
        upstream.proc.wait(30)
    except subprocess.TimeoutExpired:
        result.upstream_problems.append("the upstream did not stop within 30 s of being told to")
    for line in upstream_err.read_text(errors="replace").splitlines():
        if line.startswith("echo problem:"):
            result.upstream_problems.append(line)
        elif m := re.match(r"echo summary: (.*)", line):
            result.upstream_summary = {k: int(v) for k, v in (item.split("=") for item in m.group(1).split())}
    return result
