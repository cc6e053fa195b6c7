"""Compile farms for `fsbuild rpm --distcc HOSTS / --icecc`: the existing engines (distcc,
icecream) do the distributing; fsbuild only checks the farm before an hour-long build,
sizes make's -j to it and hands the spec a launcher (CC="distcc gcc" / "icecc gcc").

The farm never shapes the packages: the launcher is an rpmbuild --define (mock: a config
macro), not part of the SRPM or of the inputs hash, and a probe object compiled on every
host must equal the local compiler's byte for byte before the build starts."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fsbuild.errors import BuildError, ToolMissingError

ENGINES = ("distcc", "icecc")
DISTCC_PORT = 3632
DISTCC_LIMIT = 4          # distcc's default jobs per TCP/SSH host...
DISTCC_LOCAL_LIMIT = 2    # ...and for `localhost` (distcc(1), "/LIMIT")
ICECC_PORT = 8765         # scheduler: daemons and clients
ICECC_TELNET_PORT = 8766  # scheduler's text interface (listcs)
ICECC_PROTOCOL = 43       # icecream 1.4's discovery byte (schedulers answer newer clients too)
CONNECT_TIMEOUT = 5.0
PROBE_TIMEOUT = 120.0     # a probe compile on a busy host
COMPILER = "gcc"          # the spec's CC without a farm
# The engine's client inside mock's el6 chroot (EPEL 6 packages: the chroot's repos need them).
CHROOT_PACKAGES = {"distcc": "distcc", "icecc": "icecream"}
FALLBACK_HINT = "fix the farm, or pass --farm-fallback to build locally"
# Compiled on every farm host and locally: the object carries the compiler's identity
# (.comment) and its code generation, so any difference means a different compiler.
PROBE_C = b"""struct fsbuild_probe { long a; int b[3]; };
static int step(int x) { return x * 7 + (x >> 3); }
int fsbuild_probe_sum(const struct fsbuild_probe *p, int n)
{
\tint i, s = (int)p->a;
\tfor (i = 0; i < n && i < 3; i++)
\t\ts += step(p->b[i]);
\treturn s;
}
"""
PROBE_FLAGS = ["-O2", "-fno-strict-aliasing", "-mno-red-zone", "-c"]


@dataclass(frozen=True)
class DistccHost:
    """One DISTCC_HOSTS entry that takes jobs."""
    spec: str          # as written
    kind: str          # "local" | "tcp" | "ssh" | "zeroconf"
    host: str = ""     # name or address (IPv6 without brackets)
    port: int = DISTCC_PORT
    limit: int = DISTCC_LIMIT


@dataclass
class Farm:
    """How the spec's make reaches the farm."""
    engine: str                 # "distcc" | "icecc"
    launcher: str               # the spec's fsbuild_launcher: CC="<launcher> gcc"
    jobs: int                   # make -j: the farm's slots
    env: dict[str, str] = field(default_factory=dict)  # for rpmbuild / mock's chroot
    where: str = ""             # one line for the log: hosts or scheduler, slots

    @property
    def cc(self) -> str:
        return f"{self.launcher} {COMPILER}"


# ------------------------------------------------------------------ distcc

_LIMIT = re.compile(r"/(\d+)")


def parse_distcc_hosts(text: str) -> list[DistccHost]:
    """DISTCC_HOSTS (distcc(1) syntax) → the hosts that take jobs; global options
    (--randomize, --localslots...) are distcc's business and pass through."""
    hosts = [_distcc_host(tok) for tok in text.split() if not tok.startswith("--")]
    if not hosts:
        raise BuildError(f"--distcc {text!r}: no host (DISTCC_HOSTS syntax: HOST[:PORT][/LIMIT] ...)")
    return hosts


def _distcc_host(tok: str) -> DistccHost:
    if tok == "+zeroconf":
        return DistccHost(tok, "zeroconf", limit=0)
    body = tok.split(",", 1)[0]            # ,lzo ,cpp ,auth: distcc's options
    if body == "localhost" or body.startswith("localhost/"):
        limit = _limit(tok, body[len("localhost"):], DISTCC_LOCAL_LIMIT)
        return DistccHost(tok, "local", "localhost", 0, limit)
    if "@" in body:                         # [USER]@HOST[/LIMIT][:COMMAND]
        hostpart = body.split("@", 1)[1]
        name = re.split(r"[/:]", hostpart, maxsplit=1)[0]
        if not name:
            raise BuildError(f"--distcc: {tok!r} names no host")
        return DistccHost(tok, "ssh", name, 0, _limit(tok, hostpart[len(name):], DISTCC_LIMIT))
    if body.startswith("["):                # [IPv6][:PORT][/LIMIT]
        end = body.find("]")
        if end < 0:
            raise BuildError(f"--distcc: {tok!r}: unclosed IPv6 bracket")
        name, rest = body[1:end], body[end + 1:]
    else:
        name, rest = re.match(r"([^:/]*)(.*)", body).groups()  # type: ignore[union-attr]
    if not name:
        raise BuildError(f"--distcc: {tok!r} names no host")
    port_m = re.search(r":(\d+)", rest)
    if re.sub(r"(:\d+|/\d+)", "", rest):
        raise BuildError(f"--distcc: cannot read {tok!r} (HOST[:PORT][/LIMIT][,OPTIONS])")
    port = int(port_m.group(1)) if port_m else DISTCC_PORT
    if not 0 < port < 65536:
        raise BuildError(f"--distcc: {tok!r}: port {port} out of range")
    return DistccHost(tok, "tcp", name, port, _limit(tok, rest, DISTCC_LIMIT))


def _limit(tok: str, rest: str, default: int) -> int:
    m = _LIMIT.search(rest)
    limit = int(m.group(1)) if m else default
    if limit < 1:
        raise BuildError(f"--distcc: {tok!r}: a host's /LIMIT must be at least 1")
    return limit


def distcc_slots(hosts: list[DistccHost]) -> int:
    """What `distcc -j` reports: every host's limit added up."""
    return sum(h.limit for h in hosts)


def distcc_farm(hosts_text: str, probe: bool = True) -> Farm:
    """Check every DISTCC_HOSTS host (reachable, same compiler) and describe the farm.
    DISTCC_FALLBACK=0: a job distcc cannot send fails the build instead of quietly
    compiling here (local fallback is the user's call: --farm-fallback)."""
    hosts = parse_distcc_hosts(hosts_text)
    launcher = _tool("distcc", "distcc")
    if probe:
        for h in hosts:
            if h.kind == "tcp":
                check_reachable("distcc", h.host, h.port)
            if h.kind in ("tcp", "ssh"):
                check_compiler("distcc", h.spec, [launcher, COMPILER],
                               {"DISTCC_HOSTS": h.spec, "DISTCC_FALLBACK": "0",
                                "DISTCC_SKIP_LOCAL_RETRY": "1", "DISTCC_BACKOFF_PERIOD": "0"})
    env = {"DISTCC_HOSTS": hosts_text, "DISTCC_FALLBACK": "0", "DISTCC_SKIP_LOCAL_RETRY": "1"}
    # +zeroconf hosts are only known to distcc at run time: count one default host for them
    slots = distcc_slots(hosts) + sum(DISTCC_LIMIT for h in hosts if h.kind == "zeroconf")
    return Farm("distcc", "distcc", slots, env, f"distcc: {len(hosts)} host(s), {slots} slots ({hosts_text})")


# ------------------------------------------------------------------ icecream

@dataclass(frozen=True)
class IceHost:
    name: str
    address: str
    max_jobs: int


_LISTCS = re.compile(r"^\s*(\S+)\s+\(([^)]*)\)\s+\[[^\]]*\].*?\bjobs=\d+/(\d+)", re.M)


def parse_listcs(text: str) -> list[IceHost]:
    """The compile servers of the scheduler's `listcs` answer."""
    return [IceHost(m.group(1), m.group(2), int(m.group(3))) for m in _LISTCS.finditer(text)]


def scheduler_address(value: str | None) -> tuple[str, int] | None:
    """ICECC_SCHEDULER's HOST[:PORT] (as icecream reads it: the last colon splits)."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        return value, ICECC_PORT
    return host.strip("[]"), int(port)


def discover_scheduler(broadcasts: list[str] | None = None, timeout: float = 3.0) -> str | None:
    """Find a scheduler as icecream's daemons do: one byte (the protocol version) broadcast
    to UDP 8765 on every interface; the first answer's sender is the scheduler."""
    targets = broadcasts if broadcasts is not None else broadcast_addresses()
    if not targets:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.settimeout(timeout)
        for addr in targets:
            try:
                s.sendto(bytes([ICECC_PROTOCOL]), (addr, ICECC_PORT))
            except OSError:
                continue  # an interface that is down
        try:
            _, (sender, _port) = s.recvfrom(512)
        except (TimeoutError, OSError):
            return None
    return str(sender)


def broadcast_addresses() -> list[str]:
    """IPv4 broadcast addresses of this host's interfaces that are up (`ip -4 addr`)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "up"], capture_output=True,
                             text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [m.group(1) for m in re.finditer(r"\bbrd (\d+\.\d+\.\d+\.\d+)", out)]


def query_scheduler(host: str, timeout: float = CONNECT_TIMEOUT) -> str:
    """The scheduler's `listcs` answer, from its text interface."""
    try:
        with socket.create_connection((host, ICECC_TELNET_PORT), timeout=timeout) as s:
            s.sendall(b"listcs\nquit\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
    except OSError as exc:
        raise BuildError(f"farm: icecream scheduler {host}:{ICECC_TELNET_PORT} unreachable "
                         f"({_reason(exc)}); {FALLBACK_HINT}") from None
    return b"".join(chunks).decode(errors="replace")


def iceccd_socket(env: Mapping[str, str] | None = None) -> Path:
    """Where the icecc client finds the local daemon (as icecc itself looks)."""
    vars_ = os.environ if env is None else env
    if vars_.get("ICECC_TEST_SOCKET"):
        return Path(vars_["ICECC_TEST_SOCKET"])
    if os.geteuid() == 0:
        return Path("/var/run/icecc/iceccd.socket")
    return Path(vars_.get("HOME", "/")) / ".iceccd.socket"


def icecc_farm(scheduler: str | None = None, probe: bool = True) -> Farm:
    """icecream: the local iceccd (which icecc talks to) must run; the scheduler (given, or
    ICECC_SCHEDULER, or found by broadcast) names the compile servers and their slots."""
    launcher = _tool("icecc", "icecc")
    sock = iceccd_socket()
    if not unix_listening(sock):
        raise BuildError(f"farm: no local iceccd at {sock} (start iceccd; icecc would compile "
                         f"everything here); {FALLBACK_HINT}")
    given = scheduler or os.environ.get("ICECC_SCHEDULER")
    addr = scheduler_address(given)
    host = addr[0] if addr else discover_scheduler()
    if host is None:
        raise BuildError("farm: no icecream scheduler answered the broadcast on UDP "
                         f"{ICECC_PORT}; set ICECC_SCHEDULER=HOST; {FALLBACK_HINT}")
    servers = [s for s in parse_listcs(query_scheduler(host)) if s.max_jobs > 0]
    if not servers:
        raise BuildError(f"farm: the icecream scheduler on {host} has no compile server "
                         f"taking jobs; {FALLBACK_HINT}")
    if probe:
        # icecream ships the local compiler to the servers; the probe still proves that
        # a job comes back from the farm identical to a local compile.
        check_compiler("icecc", f"scheduler {host}", [launcher, COMPILER], {})
    env = {"ICECC_SCHEDULER": given} if given else {}
    if os.environ.get("ICECC_TEST_SOCKET"):
        env["ICECC_TEST_SOCKET"] = os.environ["ICECC_TEST_SOCKET"]
    slots = sum(s.max_jobs for s in servers)
    names = ", ".join(f"{s.name}/{s.max_jobs}" for s in servers)
    return Farm("icecc", "icecc", slots, env, f"icecc: scheduler {host}, {slots} slots ({names})")


# ------------------------------------------------------------------ checks

def check_reachable(engine: str, host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as exc:
        raise BuildError(f"farm: {engine} host {_hostport(host, port)} unreachable "
                         f"({_reason(exc)}); {FALLBACK_HINT}") from None


def _hostport(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _reason(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"no answer in {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    return exc.strerror or str(exc)


def check_compiler(engine: str, what: str, cmd: list[str], extra_env: dict[str, str]) -> None:
    """Compile the probe through the farm and locally: the objects must be identical."""
    with tempfile.TemporaryDirectory(prefix="fsbuild-farm-") as tmp:
        src = Path(tmp) / "fsbuild_probe.c"
        src.write_bytes(PROBE_C)
        local = _compile([COMPILER], src, Path(tmp) / "local.o", {}, "local gcc")
        remote = _compile(cmd, src, Path(tmp) / "farm.o", extra_env, f"{engine} {what}")
        if local != remote:
            raise BuildError(f"farm: {engine} {what} compiles with a different compiler "
                             f"({comment_of(remote) or 'unknown'}, local: {comment_of(local)}); "
                             f"{FALLBACK_HINT}")


def _compile(cmd: list[str], src: Path, out: Path, extra_env: dict[str, str], what: str) -> bytes:
    env = {**os.environ, **extra_env, "LC_ALL": "C"}
    try:
        done = subprocess.run([*cmd, *PROBE_FLAGS, src.name, "-o", out.name], cwd=src.parent,
                              env=env, capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise BuildError(f"farm: {what}: probe compile hung for {PROBE_TIMEOUT:g} s; "
                         f"{FALLBACK_HINT}") from None
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr or b"").decode(errors="replace").strip().splitlines()
        raise BuildError(f"farm: {what}: probe compile failed ({last[-1] if last else f'exit {done.returncode}'}); "
                         f"{FALLBACK_HINT}")
    return out.read_bytes()


def comment_of(obj: bytes) -> str:
    """The compiler's `GCC: (...) x.y.z` string inside an object (its .comment)."""
    m = re.search(rb"GCC: \([^\x00]*\)[^\x00]*", obj)
    return m.group(0).decode(errors="replace") if m else ""


def unix_listening(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(CONNECT_TIMEOUT)
            s.connect(str(path))
    except OSError:
        return False
    return True


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ToolMissingError(f"{name} not found (apt-get install {package}); "
                               "run `fsbuild doctor`")
    return name


# ------------------------------------------------------------------ choosing

def resolve(distcc: str | None, icecc: bool, scheduler: str | None = None,
            fallback: bool = False) -> Farm | None:
    """The farm the user asked for, checked; None for a local build. With `fallback` a farm
    that fails its checks means a local build (said on stderr), never a silent one."""
    if distcc is not None and icecc:
        raise BuildError("--distcc and --icecc: choose one engine")
    if distcc is None and not icecc:
        return None
    try:
        farm = distcc_farm(distcc) if distcc is not None else icecc_farm(scheduler)
    except BuildError as exc:
        if not fallback:
            raise
        from fsbuild import progress
        progress.info(f"{exc.message.split('; ' + FALLBACK_HINT)[0]}; building locally (--farm-fallback)")
        return None
    if fallback and farm.engine == "distcc":
        farm.env["DISTCC_FALLBACK"] = "1"  # the user accepts local compiles of failed jobs
        farm.env.pop("DISTCC_SKIP_LOCAL_RETRY", None)
    return farm

