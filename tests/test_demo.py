"""demo/: the server (naive, proxy, keep-alive, signals, usage), loadgen and http_load.sh on
loopback, with and without LD_PRELOAD=libsocket.so (no module on the host: fallback mode).
The helpers here are shared with test_library.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:  # tests/ as rootdir-relative modules (default) or as a package
    from conftest import require_tool
except ImportError:
    from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
HTTP_LOAD = ROOT / "demo" / "http_load.sh"


@dataclass
class Userspace:
    lib: Path
    server: Path
    loadgen: Path


def build_userspace(out: Path, cc: str = "cc") -> Userspace:
    """Build library and demo into `out` (the checkout stays clean)."""
    require_tool("make", cc)
    for sub in ("library", "demo"):
        subprocess.run(["make", "-s", "-C", str(ROOT / sub), f"CC={cc}", f"BUILDDIR={out}"],
                       check=True, capture_output=True, timeout=300)
    return Userspace(out / "libsocket.so", out / "server", out / "loadgen")


@pytest.fixture(scope="session")
def userspace(tmp_path_factory: pytest.TempPathFactory) -> Userspace:
    return build_userspace(tmp_path_factory.mktemp("userspace"))


def preload_env(lib: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTSOCKET_")}
    env.pop("LD_PRELOAD", None)
    if lib is not None:
        env["LD_PRELOAD"] = str(lib)
    env.update(extra)
    return env


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    ports: list[int]
    log: Path
    stderr: Path

    @property
    def port(self) -> int:
        return self.ports[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_server(us: Userspace, tmp: Path, *args: str, lib: Path | None = None,
                 env: dict[str, str] | None = None, addrs: int = 1, name: str = "server") -> Server:
    log, err = tmp / f"{name}.log", tmp / f"{name}.err"
    cmd = [str(us.server), *args, "-o", str(log)]
    for _ in range(addrs):
        cmd += ["-a", "127.0.0.1:0"]
    full_env = preload_env(lib, **(env or {}))
    with open(err, "wb") as e:
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=e,
                                start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        ports = [int(p) for p in re.findall(r"listening on 127\.0\.0\.1:(\d+)", text)]
        if len(ports) == addrs and "mode," in text:
            return Server(proc, ports, log, err)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    raise AssertionError(f"server did not start: {err.read_text()} {log.read_text() if log.exists() else ''}")


def loadgen(us: Userspace, port: int, *args: str, n: int = 2000, conns: int = 8,
            workers: int = 2, keepalive: bool = False) -> dict[str, float]:
    cmd = [str(us.loadgen), "-n", str(n), "-c", str(conns), "-w", str(workers), *args]
    if keepalive:
        cmd.append("-k")
    r = subprocess.run([*cmd, f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                       timeout=120, env=preload_env(None))
    last = r.stdout.strip().splitlines()[-1]
    m = re.match(r"loadgen: requests=(\d+) errors=(\d+) rps=(\d+) secs=([\d.]+)$", last)
    assert m, r.stdout + r.stderr
    return {"requests": int(m[1]), "errors": int(m[2]), "rps": int(m[3]), "secs": float(m[4]),
            "rc": r.returncode}


def worker_requests(log: Path) -> dict[int, int]:
    """cpu -> requests, from the `-v` exit lines of the workers."""
    return {int(c): int(n) for c, n in
            re.findall(r"worker \d+ on cpu (\d+) exiting, requests=(\d+)", log.read_text())}


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preload", [False, True], ids=["plain", "preload"])
@pytest.mark.parametrize("keepalive", [False, True], ids=["close", "keepalive"])
def test_server_serves_loadgen(userspace: Userspace, servers: list[Server], tmp_path: Path,
                               preload: bool, keepalive: bool) -> None:
    args = ["-w", "2"] + (["-k"] if keepalive else [])
    srv = start_server(userspace, tmp_path, *args, lib=userspace.lib if preload else None)
    servers.append(srv)
    res = loadgen(userspace, srv.port, n=3000, keepalive=keepalive)
    assert res == {**res, "requests": 3000, "errors": 0, "rc": 0}
    assert srv.stop() == 0
    assert re.search(r"server: stopped, total=3000\b", srv.log.read_text())


def test_server_several_addresses(userspace: Userspace, servers: list[Server], tmp_path: Path) -> None:
    srv = start_server(userspace, tmp_path, "-w", "1", lib=userspace.lib, addrs=2)
    servers.append(srv)
    for port in srv.ports:
        assert loadgen(userspace, port, n=200, workers=1)["errors"] == 0


@pytest.mark.parametrize("tool", ["wrk", "ab", "loadgen"])
def test_http_load_under_preload(userspace: Userspace, servers: list[Server], tmp_path: Path,
                                 tool: str) -> None:
    if tool != "loadgen":
        require_tool(tool)
    srv = start_server(userspace, tmp_path, "-w", "2", "-k", lib=userspace.lib)
    servers.append(srv)
    env = preload_env(None, HTTP_LOAD_TOOL=tool, LOADGEN=str(userspace.loadgen))
    r = subprocess.run(["sh", str(HTTP_LOAD), "2", f"http://127.0.0.1:{srv.port}/", "1"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"http_load: tool=(\w+) tasks=2 secs=1 requests=(\d+) errors=(\d+) rps=(\d+)", r.stdout)
    assert m and m[1] == tool and int(m[2]) > 100 and m[3] == "0", r.stdout
    srv.stop()
    served = int(re.findall(r"total=(\d+)", srv.log.read_text())[-1])
    assert served >= int(m[2])  # every reported request reached our server


def test_http_load_reports_errors(tmp_path: Path) -> None:
    require_tool("wrk")
    r = subprocess.run(["sh", str(HTTP_LOAD), "1", "http://127.0.0.1:1/", "1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "errors=1" in r.stdout


@pytest.mark.parametrize("args", [["x"], ["3"], ["0", "http://127.0.0.1:1/"], ["2", "ftp://a/"],
                                  ["2", "http://127.0.0.1:1/", "soon"]])
def test_http_load_usage(args: list[str]) -> None:
    r = subprocess.run(["sh", str(HTTP_LOAD), *args], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "http_load.sh" in r.stderr


def test_proxy_relays_to_two_backends(userspace: Userspace, servers: list[Server], tmp_path: Path) -> None:
    b1 = start_server(userspace, tmp_path, "-w", "1", name="b1")
    b2 = start_server(userspace, tmp_path, "-w", "1", name="b2")
    servers += [b1, b2]
    proxy = start_server(userspace, tmp_path, "-w", "2", "-k", "-x", f"127.0.0.1:{b1.port}",
                         "-x", f"127.0.0.1:{b2.port}", lib=userspace.lib, name="proxy")
    servers.append(proxy)
    for keepalive in (False, True):
        res = loadgen(userspace, proxy.port, n=1000, keepalive=keepalive)
        assert res["requests"] == 1000 and res["errors"] == 0, res
    assert proxy.stop() == 0
    totals = []
    for b in (b1, b2):
        assert b.stop() == 0
        totals.append(int(re.search(r"stopped, total=(\d+)", b.log.read_text())[1]))
    assert all(t > 0 for t in totals) and sum(totals) == 2000, totals


def test_proxy_backend_down_gives_502(userspace: Userspace, servers: list[Server], tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = start_server(userspace, tmp_path, "-w", "1", "-x", f"127.0.0.1:{dead}", lib=userspace.lib)
    servers.append(proxy)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 502 ")


@pytest.mark.parametrize("args", [["-w", "0"], ["-w", "x"], ["-a", "127.0.0.1"], ["-a", "nohost:80"],
                                  ["-x", "1.2.3.4:99999"], ["-c", "-1"], ["-Z"], ["extra"]])
def test_server_bad_args(userspace: Userspace, args: list[str]) -> None:
    r = subprocess.run([str(userspace.server), *args], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2
    assert "usage: server" in r.stderr


def test_server_listen_failure_is_reported(userspace: Userspace, servers: list[Server], tmp_path: Path) -> None:
    srv = start_server(userspace, tmp_path, "-w", "1")
    servers.append(srv)
    r = subprocess.run([str(userspace.server), "-w", "1", "-a", f"127.0.0.1:{srv.port}"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "Address already in use" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_clean_exit_on_signal(userspace: Userspace, tmp_path: Path, sig: signal.Signals) -> None:
    srv = start_server(userspace, tmp_path, "-w", "2", "-v", lib=userspace.lib)
    try:
        deadline = time.monotonic() + 5
        kids: list[str] = []
        while time.monotonic() < deadline and len(kids) < 2:
            kids = Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children").read_text().split()
            time.sleep(0.05)
        assert len(kids) == 2
        srv.proc.send_signal(sig)
        assert srv.proc.wait(timeout=10) == 0
        assert not [k for k in kids if Path(f"/proc/{k}").exists()]
        assert srv.log.read_text().count("exiting, requests=") == 2
    finally:
        srv.stop()


def test_loadgen_bad_args(userspace: Userspace) -> None:
    for args in (["-n", "0", "http://127.0.0.1:1/"], ["http://name.example:80/"], [], ["-c"]):
        r = subprocess.run([str(userspace.loadgen), *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 2 and "usage: loadgen" in r.stderr, args


def test_loadgen_counts_errors(userspace: Userspace) -> None:
    res = loadgen(userspace, 1, n=20, conns=2, workers=1)
    assert res["requests"] == 0 and res["errors"] == 20 and res["rc"] == 1


def test_loadgen_duration_mode(userspace: Userspace, servers: list[Server], tmp_path: Path) -> None:
    srv = start_server(userspace, tmp_path, "-w", "1", "-k")
    servers.append(srv)
    r = subprocess.run([str(userspace.loadgen), "-d", "1", "-c", "4", "-w", "2", "-p", "0", "-k",
                        f"http://127.0.0.1:{srv.port}/"], capture_output=True, text=True, timeout=30)
    m = re.search(r"requests=(\d+) errors=0 rps=\d+ secs=([\d.]+)", r.stdout)
    assert r.returncode == 0 and m and int(m[1]) > 100 and 0.9 < float(m[2]) < 5, r.stdout
