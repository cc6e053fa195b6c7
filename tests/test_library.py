"""library/libsocket.so on a host without the module: the fallback warning, plain
behaviour for real applications (nginx, a threaded and a forking blocking server, shells),
portable SO_REUSEPORT mode (per-worker listeners, CBPF steering by CPU) and a musl build."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:  # tests/ as rootdir-relative modules (default) or as a package
    from conftest import require_tool
    from test_demo import (Server, Userspace, build_userspace, loadgen, preload_env,  # noqa: F401
                           servers, start_server, worker_requests)
except ImportError:
    from tests.conftest import require_tool
    from tests.test_demo import (Server, Userspace, build_userspace, loadgen,  # noqa: F401
                                 preload_env, servers, start_server, worker_requests)

ROOT = Path(__file__).resolve().parent.parent
WARNING = re.compile(r"^libsocket: \S+: .*; using (plain|portable SO_REUSEPORT) sockets "
                     r"\(FASTSOCKET_QUIET=1 hides this\)$", re.M)


@pytest.fixture(scope="module")
def userspace(tmp_path_factory: pytest.TempPathFactory) -> Userspace:
    return build_userspace(tmp_path_factory.mktemp("userspace"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listeners(port: int) -> int:
    """Listening TCP sockets on `port` (all namespaces' view of this one)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


def wait_listeners(port: int, want: int, timeout: float = 10) -> int:
    """Workers spawn their listeners asynchronously: wait until `want` exist."""
    deadline = time.monotonic() + timeout
    while (n := listeners(port)) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return bool(m) and (int(m[1]), int(m[2])) >= (major, minor)


# ---- fallback warning ------------------------------------------------------------------
def test_no_module_warns_once_on_stderr(userspace: Userspace, tmp_path: Path) -> None:
    assert not Path("/dev/fastsocket").exists(), "host has the module: fallback tests do not apply"
    r = subprocess.run([str(userspace.server), "-h"], capture_output=True, text=True, timeout=10,
                       env=preload_env(userspace.lib))
    assert r.returncode == 0 and r.stdout.startswith("usage: server")
    assert len(WARNING.findall(r.stderr)) == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "libsocket" not in r.stdout


@pytest.mark.parametrize("env,expect", [({}, 1), ({"FASTSOCKET_QUIET": "1"}, 0),
                                        ({"FASTSOCKET_DISABLE": "1"}, 0),
                                        ({"FASTSOCKET_PORTABLE": "1"}, 1)],
                         ids=["default", "quiet", "disable", "portable"])
def test_warning_once_per_process_tree(userspace: Userspace, tmp_path: Path,
                                       env: dict[str, str], expect: int) -> None:
    srv = start_server(userspace, tmp_path, "-w", "2", lib=userspace.lib, env=env)
    try:
        assert loadgen(userspace, srv.port, n=200)["errors"] == 0
    finally:
        assert srv.stop() == 0
    err = srv.stderr.read_text()
    assert len(WARNING.findall(err)) == expect and err.count("\n") == expect, err
    if env.get("FASTSOCKET_PORTABLE"):
        assert "portable SO_REUSEPORT" in err


def test_device_without_our_abi_falls_back(userspace: Userspace, servers: list[Server],
                                           tmp_path: Path) -> None:
    """A device node that does not answer the version ioctl (here /dev/null) is refused."""
    srv = start_server(userspace, tmp_path, "-w", "2", lib=userspace.lib,
                       env={"FASTSOCKET_DEVICE": "/dev/null"})
    servers.append(srv)
    assert loadgen(userspace, srv.port, n=500)["errors"] == 0
    srv.stop()
    err = srv.stderr.read_text()
    assert err.startswith("libsocket: /dev/null: version query failed: ") and err.count("\n") == 1, err
    assert "using plain sockets" in err


# ---- real applications under the preload -------------------------------------------------
TSRV = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>
/* Blocking accept() from several threads or forked processes on one listen socket. */
static int lfd;
static void *serve(void *arg) {
	(void)arg;
	for (;;) {
		char buf[4096]; size_t n = 0; ssize_t r;
		int c = accept(lfd, NULL, NULL);
		if (c < 0) continue;
		while (n < sizeof(buf) && (r = read(c, buf + n, sizeof(buf) - n)) > 0) {
			n += (size_t)r;
			if (memmem(buf, n, "\r\n\r\n", 4)) break;
		}
		const char *resp = "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
		if (write(c, resp, strlen(resp)) < 0) {}
		close(c);
	}
	return NULL;
}
int main(int argc, char **argv) {
	int n = atoi(argv[2]), one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t l = sizeof(a);
	signal(SIGPIPE, SIG_IGN);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (void *)&a, sizeof(a)) || listen(lfd, 128) || getsockname(lfd, (void *)&a, &l))
		return 1;
	printf("%d\n", ntohs(a.sin_port));
	fflush(stdout);
	for (int i = 0; i < n; i++) {
		if (!strcmp(argv[1], "threads")) {
			pthread_t t;
			pthread_create(&t, NULL, serve, NULL);
		} else if (fork() == 0) {
			cpu_set_t s; CPU_ZERO(&s); CPU_SET(i % sysconf(_SC_NPROCESSORS_ONLN), &s);
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			sched_setaffinity(0, sizeof(s), &s);
			serve(NULL);
		}
	}
	pause();
	return 0;
}
"""


@pytest.fixture(scope="module")
def tsrv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("cc")
    d = tmp_path_factory.mktemp("tsrv")
    (d / "tsrv.c").write_text(TSRV)
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(d / "tsrv"), str(d / "tsrv.c")],
                   check=True, capture_output=True, timeout=120)
    return d / "tsrv"


@pytest.mark.parametrize("mode", ["threads", "fork"])
@pytest.mark.parametrize("extra", [{}, {"FASTSOCKET_PORTABLE": "1"}], ids=["fallback", "portable"])
def test_blocking_threaded_and_forking_servers(userspace: Userspace, tsrv: Path, mode: str,
                                               extra: dict[str, str]) -> None:
    env = preload_env(userspace.lib, FASTSOCKET_QUIET="1", **extra)
    proc = subprocess.Popen([str(tsrv), mode, "4"], stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        res = loadgen(userspace, port, n=2000, conns=8)
        assert res["requests"] == 2000 and res["errors"] == 0, res
        assert listeners(port) == 1  # blocking listeners are never split
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


NGINX_CONF = """
{user}
daemon off;
master_process on;
worker_processes 2;
worker_cpu_affinity auto;
pid {d}/nginx.pid;
error_log {d}/error.log notice;
events {{ worker_connections 512; }}
http {{
  access_log off;
  client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;
  uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "fastsocket nginx\\n"; }}
  }}
}}
"""


@pytest.mark.parametrize("extra", [{}, {"FASTSOCKET_PORTABLE": "1"}], ids=["fallback", "portable"])
def test_nginx_under_preload(userspace: Userspace, tmp_path: Path, extra: dict[str, str]) -> None:
    require_tool("nginx")
    port = free_port()
    # SO_REUSEPORT groups need one owner: workers must keep the uid that created the socket
    user = "user root root;" if os.geteuid() == 0 else ""
    (tmp_path / "nginx.conf").write_text(NGINX_CONF.format(d=tmp_path, port=port, user=user))
    proc = subprocess.Popen(["nginx", "-e", str(tmp_path / "error.log"), "-p", str(tmp_path),
                             "-c", str(tmp_path / "nginx.conf")], env=preload_env(userspace.lib, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while listeners(port) == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1]
        res = loadgen(userspace, port, n=2000, conns=8)
        assert res["requests"] == 2000 and res["errors"] == 0, res
        if extra:  # workers pinned by worker_cpu_affinity: each got its own listener
            assert wait_listeners(port, 3) == 3
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "error.log").read_text()
    assert not re.search(r"\[(emerg|alert|crit)\]", log), log
    assert len(WARNING.findall(proc.stderr.read())) == 1  # type: ignore[union-attr]


def test_non_socket_fds_untouched(userspace: Userspace, tmp_path: Path) -> None:
    script = f"exec 3>{tmp_path}/f; echo hi >&3; exec 3>&-; exec 4<{tmp_path}/f; cat <&4; exec 4<&-"
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10,
                       env=preload_env(userspace.lib, FASTSOCKET_PORTABLE="1", FASTSOCKET_QUIET="1"))
    assert r.returncode == 0 and r.stdout == "hi\n" and r.stderr == ""


# ---- portable mode -------------------------------------------------------------------
PORTABLE_PROBE = textwrap.dedent("""
    import fcntl, json, os, select, socket, sys

    def listeners(port):
        n = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for row in open(table).read().splitlines()[1:]:
                f = row.split()
                n += f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port
        return n

    cpu = sorted(os.sched_getaffinity(0))[0]
    out = {}

    def listener(nonblocking=True, reuseport=False):
        s = socket.socket()
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        s.setblocking(not nonblocking)
        return s, s.getsockname()[1]

    s, port = listener()
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN)
    out["unpinned"] = listeners(port)          # not pinned: nothing spawned
    ep.unregister(s.fileno()); s.close()

    os.sched_setaffinity(0, {cpu})
    s, port = listener()
    flags = fcntl.fcntl(s.fileno(), fcntl.F_GETFL)
    ep.register(s.fileno(), select.EPOLLIN)
    out["pinned"] = listeners(port)            # own listener joined the group
    out["flags_kept"] = fcntl.fcntl(s.fileno(), fcntl.F_GETFL) == flags
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    got, fds = 0, set()
    while got < 20:
        events = ep.poll(2)
        if not events:
            break
        for fd, _ in events:
            fds.add(fd)
            while True:
                try:
                    c, _ = s.accept()
                except BlockingIOError:
                    break
                got += 1
                c.close()
    out["accepted"] = got
    out["event_fds"] = sorted(fds) == [s.fileno()]
    for c in clients:
        c.close()
    ep.modify(s.fileno(), select.EPOLLIN | select.EPOLLET)
    ep.unregister(s.fileno())
    s.close()
    out["after_close"] = listeners(port)

    s, port = listener()
    ep.register(s.fileno(), select.EPOLLIN)
    rd, wr = os.pipe()
    child = os.fork()                          # must not inherit the local listener
    if child == 0:
        os.write(wr, b"x")                     # after the atfork handlers ran
        import time; time.sleep(5); os._exit(0)
    os.read(rd, 1)
    ep.unregister(s.fileno()); s.close()
    out["after_fork_close"] = listeners(port)  # only the child's copy of the global one
    os.kill(child, 9); os.waitpid(child, 0)

    s, port = listener()
    ep.register(s.fileno(), select.EPOLLIN)
    os.dup2(os.open(os.devnull, os.O_RDONLY), s.fileno())
    out["after_dup2"] = listeners(port)

    s, port = listener(reuseport=True)
    ep.register(s.fileno(), select.EPOLLIN)
    out["app_reuseport"] = listeners(port)     # the app's own group is left alone
    s.close()

    s, port = listener(nonblocking=False)
    ep.register(s.fileno(), select.EPOLLIN)
    out["blocking"] = listeners(port)
    c = socket.create_connection(("127.0.0.1", port))
    a, _ = s.accept()
    out["blocking_accept"] = True
    print(json.dumps(out))
""")


def test_portable_mode_listener_lifecycle(userspace: Userspace) -> None:
    if not kernel_at_least(3, 9):
        pytest.skip("SO_REUSEPORT needs Linux >= 3.9")
    r = subprocess.run([sys.executable, "-c", PORTABLE_PROBE],
                       capture_output=True, text=True, timeout=60,
                       env=preload_env(userspace.lib, FASTSOCKET_PORTABLE="1", FASTSOCKET_QUIET="1"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"unpinned": 1, "pinned": 2, "flags_kept": True, "accepted": 20, "event_fds": True,
                   "after_close": 0, "after_fork_close": 1, "after_dup2": 0, "app_reuseport": 1, "blocking": 1,
                   "blocking_accept": True}


def test_portable_mode_demo_server(userspace: Userspace, servers: list[Server], tmp_path: Path) -> None:
    srv = start_server(userspace, tmp_path, "-w", "2", "-k", lib=userspace.lib,
                       env={"FASTSOCKET_PORTABLE": "1"})
    servers.append(srv)
    for keepalive in (False, True):
        res = loadgen(userspace, srv.port, n=3000, keepalive=keepalive)
        assert res["requests"] == 3000 and res["errors"] == 0, res
    assert wait_listeners(srv.port, 3) == 3  # the inherited socket + one per pinned worker
    assert srv.stop() == 0
    assert wait_listeners(srv.port, 0) == 0


def test_portable_mode_steers_by_cpu(userspace: Userspace, servers: list[Server], tmp_path: Path) -> None:
    if len(cpus()) < 2:
        pytest.skip("steering by CPU needs at least 2 usable CPUs")
    if not kernel_at_least(4, 5):
        pytest.skip("SO_ATTACH_REUSEPORT_CBPF needs Linux >= 4.5")
    first, second = cpus()[:2]
    if second != first + 1:
        pytest.skip(f"needs two consecutive CPUs, have {cpus()}")
    srv = start_server(userspace, tmp_path, "-w", "2", "-c", str(first), "-v", lib=userspace.lib,
                       env={"FASTSOCKET_PORTABLE": "1"})
    assert wait_listeners(srv.port, 3) == 3  # both workers registered with epoll: spawned
    # loopback processes the SYN on the client's CPU: pin the client, all must land there
    for cpu, n in ((first, 1000), (second, 600)):
        res = loadgen(userspace, srv.port, "-p", str(cpu), n=n, conns=4, workers=1)
        assert res["errors"] == 0
    srv.stop()
    per_cpu = worker_requests(srv.log)
    assert per_cpu.get(first, 0) >= 950 and per_cpu.get(second, 0) >= 570, per_cpu


# ---- musl ----------------------------------------------------------------------------
def test_musl_build_works(tmp_path: Path, servers: list[Server]) -> None:
    require_tool("musl-gcc")
    if not Path("/lib/ld-musl-x86_64.so.1").exists():
        pytest.skip("musl dynamic loader /lib/ld-musl-x86_64.so.1 missing (apt install musl)")
    us = build_userspace(tmp_path / "musl", cc="musl-gcc")
    assert b"/lib/ld-" not in us.loadgen.read_bytes()  # static: no program interpreter
    assert b"/lib/ld-musl-x86_64.so.1" in us.server.read_bytes()  # dynamic: LD_PRELOAD works
    for extra in ({}, {"FASTSOCKET_PORTABLE": "1"}):
        srv = start_server(us, tmp_path, "-w", "2", "-k", lib=us.lib, env=extra,
                           name=f"musl{len(extra)}")
        servers.append(srv)
        res = loadgen(us, srv.port, n=2000)
        assert res["requests"] == 2000 and res["errors"] == 0, res
        assert srv.stop() == 0
        assert len(WARNING.findall(srv.stderr.read_text())) == 1  # the musl library was loaded
