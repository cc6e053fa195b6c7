"""library/libsocket.so on a host without the module: the fallback warning, plain
behaviour for real applications (nginx, a threaded and a forking blocking server, shells),
portable SO_REUSEPORT mode (per-worker listeners, CBPF steering by CPU), module mode through
a fake module (its ioctls answered in user space), async-signal safety, SA_RESTART, dup
tracking, SO_REUSEPORT only while managed, and a musl build."""

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
from conftest import require_tool
from test_demo import (
    Server,
    Userspace,
    build_userspace,
    loadgen,
    preload_env,
    start_server,
    worker_requests,
)

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


def compile_c(factory: pytest.TempPathFactory, name: str, source: str, *flags: str) -> Path:
    """A host C test program (or, with -shared, a preload) built from `source`."""
    require_tool("cc")
    d = factory.mktemp(name)
    (d / f"{name}.c").write_text(source)
    out = d / name
    subprocess.run(["cc", "-O2", "-pthread", *flags, "-o", str(out), str(d / f"{name}.c")],
                   check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def tsrv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "tsrv", TSRV)


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


# ---- async-signal safety, SA_RESTART, dup tracking, SO_REUSEPORT (issue 10) -------------
SIGPROBE = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <dirent.h>
#include <pthread.h>
#include <unistd.h>
/* Signal-safety probes run under libsocket.so in portable mode (pinned, epoll: spawned):
 *   sigsafe N     a SIGALRM handler closes tracked listeners while the main thread loops
 *                 over socket/listen/epoll_ctl/accept/close of other listeners
 *   restart M     blocking accept() interrupted by SIGALRM: M=0 no SA_RESTART, 1 SA_RESTART,
 *                 2 no SA_RESTART while SIGUSR1 has a handler with it, 3 the reverse
 *   churn T N     T threads create, dup, accept on and close spawned listeners N times
 *                 while forks come and go; "leaked" counts fds left over at the end */
static int pool[4096];
static volatile sig_atomic_t next_fd, npool, fired, note_fd = -1;

static void on_alarm(int sig)
{
	int e = errno;
	(void)sig;
	if (next_fd < npool)
		close(pool[next_fd++]);
	fired++;
	if (note_fd >= 0 && write(note_fd, "x", 1) < 0) {}
	errno = e;
}

static int listeners(int port)
{
	const char *t[] = { "/proc/net/tcp", "/proc/net/tcp6" };
	char line[512], want[16];
	int n = 0;
	snprintf(want, sizeof(want), ":%04X ", port);
	for (int i = 0; i < 2; i++) {
		FILE *f = fopen(t[i], "r");
		while (f && fgets(line, sizeof(line), f)) {
			char *p = strstr(line, want); /* local address comes first */
			if (p && p < strstr(line, " ") + 20 && strstr(p + 6, " 0A "))
				n++;
		}
		if (f)
			fclose(f);
	}
	return n;
}

static int listener(int ep, int *port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t l = sizeof(a);
	struct epoll_event ev = { .events = EPOLLIN };
	int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (s < 0 || bind(s, (void *)&a, sizeof(a)) || listen(s, 16) || getsockname(s, (void *)&a, &l))
		return -1;
	ev.data.fd = s;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev)) /* pinned + non-blocking + epoll: spawned */
		return -1;
	if (port)
		*port = ntohs(a.sin_port);
	return s;
}

static int nfds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;
	while (d && readdir(d))
		n++;
	if (d)
		closedir(d);
	return n;
}

static int churn_n;

static void *churn_thread(void *arg)
{
	int ep = epoll_create1(0), i, t = (int)(long)arg;

	for (i = 0; i < churn_n; i++) {
		int s = listener(ep, NULL), d;
		if (s < 0)
			return (void *)1;
		d = (i + t) % 3 == 0 ? dup(s) : (i + t) % 3 == 1 ? fcntl(s, F_DUPFD_CLOEXEC, 0) : dup3(s, 900 + t, 0);
		if (d < 0 || (accept(i % 2 ? d : s, NULL, NULL) >= 0 || errno != EAGAIN))
			return (void *)2;
		if (i % 2) {
			close(s);
			close(d);
		} else {
			close(d);
			close(s);
		}
		if (t == 0 && i % 25 == 0) {
			pid_t k = fork();
			if (k == 0)
				_exit(0);
			waitpid(k, NULL, 0);
		}
	}
	close(ep);
	return NULL;
}

static int churn(int threads, int n)
{
	pthread_t th[16];
	void *r;
	int i, base = nfds(), bad = 0;

	churn_n = n;
	for (i = 0; i < threads && i < 16; i++)
		pthread_create(&th[i], NULL, churn_thread, (void *)(long)i);
	for (i = 0; i < threads && i < 16; i++) {
		pthread_join(th[i], &r);
		bad |= r != NULL;
	}
	printf("{\"failed\": %s, \"leaked\": %d}\n", bad ? "true" : "false", nfds() - base);
	return 0;
}

static void pin(void)
{
	cpu_set_t s;
	int c = 0;
	sched_getaffinity(0, sizeof(s), &s);
	while (!CPU_ISSET(c, &s))
		c++;
	CPU_ZERO(&s);
	CPU_SET(c, &s);
	sched_setaffinity(0, sizeof(s), &s);
}

static int sigsafe(int rounds)
{
	struct rlimit rl;
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = SA_RESTART };
	struct itimerval it = { { 0, 300 }, { 0, 300 } };
	int ep = epoll_create1(0), i, port, spawned, base = nfds();

	getrlimit(RLIMIT_NOFILE, &rl);
	rl.rlim_cur = rl.rlim_max;
	setrlimit(RLIMIT_NOFILE, &rl);
	for (npool = 0; npool < rounds && npool < 4096; npool++)
		if ((pool[npool] = listener(ep, &port)) < 0)
			return 2;
	spawned = listeners(port);
	sigaction(SIGALRM, &sa, NULL);
	setitimer(ITIMER_REAL, &it, NULL);
	for (i = 0; next_fd < npool; i++) {
		int s = listener(ep, NULL);
		if (s < 0 || accept(s, NULL, NULL) >= 0 || errno != EAGAIN)
			return 3;
		close(s);
	}
	memset(&it, 0, sizeof(it));
	setitimer(ITIMER_REAL, &it, NULL);
	printf("{\"rounds\": %d, \"signals\": %d, \"closed\": %d, \"spawned\": %d, \"leaked\": %d}\n",
	       i, (int)fired, (int)next_fd, spawned, nfds() - base);
	return 0;
}

static void on_usr1(int sig) { (void)sig; }

static int restart(int m)
{
	struct sigaction sa = { .sa_handler = on_alarm, .sa_flags = m & 1 ? SA_RESTART : 0 };
	struct sigaction other = { .sa_handler = on_usr1, .sa_flags = m & 1 ? 0 : SA_RESTART };
	struct itimerval it = { { 0, 0 }, { 0, 200000 } };
	int ep = epoll_create1(0), port, s = listener(ep, &port), c, err, n, pp[2];
	pid_t kid;

	if (s < 0 || pipe(pp))
		return 2;
	n = listeners(port);
	fcntl(s, F_SETFL, fcntl(s, F_GETFL) & ~O_NONBLOCK); /* blocking accept after the split */
	kid = fork();
	if (kid == 0) { /* connect once the handler ran */
		struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
					 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
		int k = socket(AF_INET, SOCK_STREAM, 0);
		char x;
		close(pp[1]);
		if (read(pp[0], &x, 1) != 1)
			_exit(1);
		usleep(200000);
		connect(k, (void *)&a, sizeof(a));
		usleep(300000);
		_exit(0);
	}
	close(pp[0]);
	note_fd = pp[1];
	sigaction(SIGALRM, &sa, NULL);
	if (m >= 2)
		sigaction(SIGUSR1, &other, NULL);
	setitimer(ITIMER_REAL, &it, NULL);
	c = accept(s, NULL, NULL);
	err = errno;
	waitpid(kid, NULL, 0);
	printf("{\"accepted\": %s, \"errno\": \"%s\", \"signals\": %d, \"listeners\": %d}\n",
	       c >= 0 ? "true" : "false", c >= 0 ? "" : strerrorname_np(err), (int)fired, n);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IONBF, 0);
	pin();
	if (argc == 3 && !strcmp(argv[1], "sigsafe"))
		return sigsafe(atoi(argv[2]));
	if (argc == 3 && !strcmp(argv[1], "restart"))
		return restart(atoi(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "churn"))
		return churn(atoi(argv[2]), atoi(argv[3]));
	return 1;
}
"""


@pytest.fixture(scope="module")
def sigprobe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "sigprobe", SIGPROBE)


FAKE_MODULE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "fastsocket_abi.h"
/* Test stand-in for fastsocket.ko, preloaded after libsocket.so: answers the ABI's
 * ioctls (on any fd, e.g. FASTSOCKET_DEVICE=/dev/null) with plain syscalls.  SPAWN hands
 * out an eventfd as the local listener (never readable), so leaks show as fds. */
static long sys(long n, long a, long b, long c, long d)
{
	long r = syscall(n, a, b, c, d);
	return r;
}

int ioctl(int fd, unsigned long req, ...)
{
	va_list ap;
	void *arg;
	long r;

	va_start(ap, req);
	arg = va_arg(ap, void *);
	va_end(ap);
	switch (req) {
	case FSOCK_IOC_VERSION: {
		struct fsock_version *v = arg;
		v->abi = FASTSOCKET_ABI_VERSION;
		v->features = FSOCK_FEAT_LISTEN_SPAWN;
		v->listen_spawn = 2;
		return 0;
	}
	case FSOCK_IOC_SOCKET: {
		struct fsock_socket_args *a = arg;
		r = sys(SYS_socket, a->family, a->type, a->protocol, 0);
		if (r < 0)
			return -1;
		a->fd = (int)r;
		return 0;
	}
	case FSOCK_IOC_LISTEN: {
		struct fsock_listen_args *a = arg;
		return (int)sys(SYS_listen, a->fd, a->backlog, 0, 0);
	}
	case FSOCK_IOC_SPAWN: {
		struct fsock_spawn_args *a = arg;
		/* FAKEMOD_LOCAL_READY=1: a local that stays readable (a queue only its owner
		 * may drain, as the module's per-thread locals are for other threads) */
		r = sys(SYS_eventfd2, getenv("FAKEMOD_LOCAL_READY") ? 1 : 0, EFD_CLOEXEC, 0, 0);
		if (r < 0)
			return -1;
		a->local_fd = (int)r;
		return 0;
	}
	case FSOCK_IOC_ACCEPT: {
		struct fsock_accept_args *a = arg;
		struct pollfd p = { .fd = a->fd, .events = POLLIN };
		if (sys(SYS_poll, (long)&p, 1, 0, 0) != 1) { /* the module's accept never sleeps */
			errno = EAGAIN;
			return -1;
		}
		r = sys(SYS_accept4, a->fd, (long)a->addr, (long)a->addrlen, a->flags | SOCK_NONBLOCK);
		if (r < 0)
			return -1;
		a->new_fd = (int)r;
		if (!(a->flags & SOCK_NONBLOCK)) /* the accepted socket keeps the caller's mode */
			sys(SYS_fcntl, r, F_SETFL, 0, 0);
		return 0;
	}
	case FSOCK_IOC_CLOSE: {
		struct fsock_close_args *a = arg;
		return (int)sys(SYS_close, a->fd, 0, 0, 0);
	}
	case FSOCK_IOC_SHUTDOWN: {
		struct fsock_shutdown_args *a = arg;
		return (int)sys(SYS_shutdown, a->fd, a->how, 0, 0);
	}
	}
	return (int)sys(SYS_ioctl, fd, (long)req, (long)arg, 0);
}
"""


@pytest.fixture(scope="module")
def fakemod(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's ioctls answered in user space, so module mode runs on the host."""
    return compile_c(tmp_path_factory, "fakemod.so", FAKE_MODULE, "-shared", "-fPIC",
                     f"-I{ROOT / 'module'}")


def mode_env(mode: str, userspace: Userspace, fakemod: Path) -> dict[str, str]:
    """portable: SO_REUSEPORT locals (kernel >= 3.9); module: the fake module preloaded
    after the library (the device node is /dev/null, its ioctls never reach it)."""
    if mode == "portable":
        return portable_env(userspace)
    return preload_env(userspace.lib, LD_PRELOAD=f"{userspace.lib} {fakemod}",
                       FASTSOCKET_DEVICE="/dev/null", FASTSOCKET_QUIET="1")


def run_probe(cmd: list[str], env: dict[str, str], timeout: float = 30) -> dict[str, object]:
    """Run a probe printing one JSON line; a hang (deadlock) fails the test."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{cmd[-2:]} hung for {timeout} s: deadlock")
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return json.loads(r.stdout)


def portable_env(userspace: Userspace) -> dict[str, str]:
    if not kernel_at_least(3, 9):
        pytest.skip("portable mode (tracked, spawned listeners) needs SO_REUSEPORT, Linux >= 3.9")
    return preload_env(userspace.lib, FASTSOCKET_PORTABLE="1", FASTSOCKET_QUIET="1")


@pytest.mark.parametrize("mode", ["portable", "module"])
def test_signal_handler_closing_tracked_fds_never_deadlocks(userspace: Userspace, sigprobe: Path,
                                                            fakemod: Path, mode: str) -> None:
    """Item 19: a SIGALRM handler (every 300 us) closes tracked, spawned listeners while
    the main thread is inside socket/listen (module: spawn)/epoll_ctl (portable: spawn)/
    accept/close of others.  The old interposers took a process mutex there: the handler
    deadlocked its thread, in both modes."""
    out = run_probe([str(sigprobe), "sigsafe", "400"], mode_env(mode, userspace, fakemod))
    # portable: the listeners were split (module: the local is the fake's eventfd)
    assert out["spawned"] == (2 if mode == "portable" else 1), out
    assert out["closed"] == 400 and out["signals"] >= 400 and out["rounds"] > 0, out
    assert out["leaked"] == 0, out  # every local listener was released exactly once


@pytest.mark.parametrize("mode", ["portable", "module"])
def test_threads_dup_close_and_fork_leak_nothing(userspace: Userspace, sigprobe: Path, fakemod: Path,
                                                 mode: str) -> None:
    """Items 19, 21: listener slots are reference-counted across dup copies, calls in
    flight and forks; whichever close comes last releases the local listener, once."""
    out = run_probe([str(sigprobe), "churn", "4", "300"], mode_env(mode, userspace, fakemod), timeout=60)
    assert out == {"failed": False, "leaked": 0}


BLOCKING_IMPORTS = re.compile(r"^(malloc|calloc|realloc|free|aligned_alloc|posix_memalign|"
                              r"pthread_mutex_(timed)?lock|pthread_mutex_trylock|pthread_rwlock_\w+|"
                              r"pthread_spin_lock|pthread_cond_\w*wait|sem_(timed)?wait)$")


def test_library_imports_no_allocator_or_lock(userspace: Userspace) -> None:
    """Item 19, statically: nothing the library calls can allocate or wait for a lock
    (pthread_once only runs before the constructor finished), so no interposer can
    deadlock against the thread a handler interrupted.  The old library imported
    calloc, free and pthread_mutex_lock."""
    require_tool("nm")
    r = subprocess.run(["nm", "-D", "--undefined-only", str(userspace.lib)], capture_output=True,
                       text=True, timeout=30, check=True)
    names = {line.split()[-1].split("@")[0] for line in r.stdout.splitlines() if line.strip()}
    assert "close" not in names and "socket" not in names  # sanity: these are ours, not imports
    assert sorted(n for n in names if BLOCKING_IMPORTS.match(n)) == []


@pytest.mark.parametrize("lib_mode", ["portable", "module"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3],
                         ids=["no_restart", "sa_restart", "mixed_no_restart", "mixed_sa_restart"])
def test_blocking_accept_honours_sa_restart(userspace: Userspace, sigprobe: Path, fakemod: Path,
                                            mode: int, lib_mode: str) -> None:
    """Item 20: a blocking accept() on a split listener, interrupted by SIGALRM, restarts
    under SA_RESTART and returns EINTR without it, exactly like the kernel's own accept
    (the same probe under FASTSOCKET_DISABLE=1), also when another signal's handler
    has the other flag (modes 2, 3)."""
    kernel = run_probe([str(sigprobe), "restart", str(mode)],
                       preload_env(userspace.lib, FASTSOCKET_DISABLE="1"))
    ours = run_probe([str(sigprobe), "restart", str(mode)], mode_env(lib_mode, userspace, fakemod))
    if lib_mode == "portable":  # split: the library's wait, not the kernel's accept
        assert ours["listeners"] == 2 and kernel["listeners"] == 1, (ours, kernel)
    assert ours["signals"] == kernel["signals"] == 1
    assert (ours["accepted"], ours["errno"]) == (kernel["accepted"], kernel["errno"]), (ours, kernel)
    assert kernel["accepted"] == bool(mode & 1)


DUP_PROBE = textwrap.dedent('''
import ctypes, fcntl, json, os, select, socket, sys

libc = ctypes.CDLL(None, use_errno=True)  # the preloaded library's symbols come first
F_DUPFD, F_DUPFD_CLOEXEC, O_CLOEXEC = 0, 1030, 0o2000000
COPY = {
    "dup": lambda fd: libc.dup(fd),
    "fcntl_dupfd": lambda fd: libc.fcntl(fd, F_DUPFD, 0),
    "fcntl_dupfd_cloexec": lambda fd: libc.fcntl(fd, F_DUPFD_CLOEXEC, 0),
    "os_dup": os.dup,
    "dup2": lambda fd: libc.dup2(fd, 200),
    "dup3": lambda fd: libc.dup3(fd, 201, O_CLOEXEC),
}

def listeners(port):
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in open(table).read().splitlines()[1:]:
            f = row.split()
            n += f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port
    return n

def eventfds():                                       # the fake module's locals
    n = 0
    for f in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{f}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return n

def state():
    return [listeners(port), eventfds()]

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
out = {}
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(64)
s.setblocking(False)
port = s.getsockname()[1]
select.epoll().register(s.fileno(), select.EPOLLIN)   # pinned + epoll: own listener
out["spawned"] = state()
d = COPY[sys.argv[1]](s.fileno())
assert d >= 0, ctypes.get_errno()
s.close()                                             # the copy keeps socket and local
out["after_close_original"] = state()
ep = select.epoll()
ep.register(d, select.EPOLLIN)                        # tracked: no second local
out["after_register_copy"] = state()
clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
ls = socket.socket(fileno=d)
got = 0
while got < 20 and ep.poll(2):
    while True:
        try:
            c, _ = ls.accept()
        except BlockingIOError:
            break
        got += 1
        c.close()
out["accepted"] = got
for c in clients:
    c.close()
ls.close()
out["after_close_copy"] = state()
print(json.dumps(out))
''')


@pytest.mark.parametrize("copy", ["dup", "fcntl_dupfd", "fcntl_dupfd_cloexec", "os_dup", "dup2", "dup3"])
@pytest.mark.parametrize("mode", ["portable", "module"])
def test_dup_copy_keeps_listener_tracked(userspace: Userspace, fakemod: Path, copy: str, mode: str) -> None:
    """Item 21: a copy of a spawned listener (dup, F_DUPFD[_CLOEXEC], dup2, dup3) shares the
    socket's tracking: closing the original keeps the local listener for the copy, epoll
    on the copy spawns nothing new, it accepts everything, and its close releases all.
    State: [listening sockets on the port, the fake module's local listeners]."""
    r = subprocess.run([sys.executable, "-c", DUP_PROBE, copy], capture_output=True, text=True,
                       timeout=60, env=mode_env(mode, userspace, fakemod))
    assert r.returncode == 0, r.stderr
    live = [2, 0] if mode == "portable" else [1, 1]
    assert json.loads(r.stdout) == {"spawned": live, "after_close_original": live,
                                    "after_register_copy": live, "accepted": 20, "after_close_copy": [0, 0]}


REUSEPORT_PROBE = textwrap.dedent('''
import json, os, resource, select, socket

def reuseport(s):
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)

def bind_plain(port):                   # a second server without SO_REUSEPORT
    t = socket.socket()
    try:
        t.bind(("127.0.0.1", port))
        return "bound"
    except OSError as e:
        return os.strerror(e.errno)
    finally:
        t.close()

def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    s.setblocking(False)
    return s, s.getsockname()[1]

cpu = sorted(os.sched_getaffinity(0))[0]
out = {}
# a worker's local leaves (worker closes its copy, exits): the master's socket is plain again
s, port = listener()
rd, wr = os.pipe()
rd2, wr2 = os.pipe()
kid = os.fork()
if kid == 0:
    os.sched_setaffinity(0, {cpu})
    ep = select.epoll()
    ep.register(s.fileno(), select.EPOLLIN)
    os.write(wr, b"%d" % reuseport(s))
    os.read(rd2, 1)                     # wait for the parent's look
    s.close()
    os._exit(0)
out["while_managed"] = int(os.read(rd, 1))
os.write(wr2, b"x")
os.waitpid(kid, 0)
out["after_worker_left"] = reuseport(s)
out["plain_second_server"] = bind_plain(port)
s.close()
# spawn fails (no fd left for the local): the application's socket stays as it was
os.sched_setaffinity(0, {cpu})
s, port = listener()
ep = select.epoll()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (os.dup(0) + 1, hard))
ep.register(s.fileno(), select.EPOLLIN)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
out["failed_spawn"] = reuseport(s)
print(json.dumps(out))
''')


def test_reuseport_only_while_managed(userspace: Userspace) -> None:
    """Item 4, library side: SO_REUSEPORT is on the application's socket only while a local
    listener of the library is in its group: cleared when the last worker's local leaves
    (the master keeps a plain socket), never left behind by a spawn that failed (no fd
    for the local).  A second plain server gets EADDRINUSE throughout."""
    r = subprocess.run([sys.executable, "-c", REUSEPORT_PROBE], capture_output=True, text=True,
                       timeout=60, env=portable_env(userspace))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"while_managed": 1, "after_worker_left": 0,
                                    "plain_second_server": os.strerror(98), "failed_spawn": 0}


MODULE_REUSEPORT_PROBE = textwrap.dedent("""
    import os, select, socket
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    s = socket.socket()                     # FSOCK_IOC_SOCKET
    s.bind(("127.0.0.1", 0))
    s.listen(64)                            # FSOCK_IOC_LISTEN, pinned: FSOCK_IOC_SPAWN
    s.setblocking(False)
    select.epoll().register(s.fileno(), select.EPOLLIN)
    print(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
""")


def test_module_mode_library_sets_no_reuseport(userspace: Userspace, fakemod: Path) -> None:
    """Item 4, library side in module mode: whatever SO_REUSEPORT a socket gets is the
    module's doing (the fake module sets none), never the library's."""
    r = subprocess.run([sys.executable, "-c", MODULE_REUSEPORT_PROBE], capture_output=True, text=True,
                       timeout=60, env=mode_env("module", userspace, fakemod))
    assert r.returncode == 0 and r.stdout == "0\n", (r.stdout, r.stderr)


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


# The probes find fds by what /proc/self/fd links them to (the device, a fake local).
FD_BY_LINK = r"""
static int fd_linked(const char *needle, int skip)
{
	char link[64], path[64];
	int fd, found = -1;

	for (fd = 3; fd < 64; fd++) {
		snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
		memset(link, 0, sizeof(link));
		if (fd != skip && readlink(path, link, sizeof(link) - 1) > 0 && strstr(link, needle))
			found = fd;
	}
	return found;
}
"""

CLOSEPROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>
/* close_range/closefrom against the library's own fds.  argv[1]: close_range, closefrom,
 * closefrom_nosys (the kernel answers close_range with ENOSYS, as before 5.9).
 * Prints the device fd, the fds open after closing from the listener on, whether the
 * library's local listener survived while its listener (below the range) lives, and
 * whether a socket made afterwards really closes. */
static int is_open(int fd) { return fcntl(fd, F_GETFD) >= 0; }
/* FD_BY_LINK */

static int listener(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int s = socket(AF_INET, SOCK_STREAM, 0);

	if (s < 0 || bind(s, (void *)&a, sizeof(a)) || listen(s, 16))
		return -1;
	return s;
}

static void no_close_range(void)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 436 /* close_range */, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = 4, .filter = f };

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) {
		perror("seccomp");
		_exit(2);
	}
}

int main(int argc, char **argv)
{
	struct epoll_event ev = { .events = EPOLLIN };
	int dev = fd_linked("/dev/null", -1); /* the device the library opened (FASTSOCKET_DEVICE) */
	int fd, keep, ep, l, lfd, after, s, n = 0, nosys = !strcmp(argv[1], "closefrom_nosys");

	keep = listener();                  /* below the first range: lives on */
	ep = epoll_create1(0);
	epoll_ctl(ep, EPOLL_CTL_ADD, keep, &ev); /* spawns its local (an eventfd) */
	lfd = fd_linked("eventfd", ep);
	l = listener();                     /* in the range: released through close() */
	epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
	after = open("/dev/zero", O_RDONLY);
	if (nosys)
		no_close_range();
	if (!strcmp(argv[1], "close_range") ? close_range(ep, ~0U, 0) : (closefrom(ep), 0)) {
		perror("close_range");
		return 2;
	}
	printf("{\"dev\": %d, \"keep\": %d, \"lfd\": %d, \"ep\": %d, \"after_open\": %d, \"open\": [",
	       dev, keep, lfd, ep, is_open(after));
	for (fd = 0; fd < 64; fd++)
		if (is_open(fd))
			printf("%s%d", n++ ? ", " : "", fd);
	/* then everything from 3: the listener below goes through close(), its local too */
	if (!strcmp(argv[1], "close_range") ? close_range(3, ~0U, 0) : (closefrom(3), 0))
		return 2;
	printf("], \"open_all\": [");
	for (fd = 0, n = 0; fd < 64; fd++)
		if (is_open(fd))
			printf("%s%d", n++ ? ", " : "", fd);
	s = socket(AF_INET, SOCK_STREAM, 0);
	printf("], \"new_socket\": %d, \"new_is_dev\": %d, ", s, s == dev);
	close(s);
	printf("\"new_closed\": %d}\n", !is_open(s));
	return 0;
}
"""


@pytest.fixture(scope="module")
def closeprobe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "closeprobe", CLOSEPROBE.replace("/* FD_BY_LINK */", FD_BY_LINK))


@pytest.mark.parametrize("how", ["close_range", "closefrom", "closefrom_nosys"])
def test_close_range_and_closefrom_keep_the_librarys_fds(userspace: Userspace, fakemod: Path,
                                                          closeprobe: Path, how: str) -> None:
    """A daemon's `closefrom(n)`/`close_range(n, ~0U, 0)` closes the app's fds, tracked ones
    through close() (the spawned local of a listener in the range goes with it), and never
    the library's own: the device (else the next socket reuses its number and its close()
    does nothing) and the local of a listener below the range (else its release would
    later close whatever reused the number)."""
    if not kernel_at_least(5, 9):
        pytest.skip("close_range(2) needs Linux >= 5.9")
    r = run_probe([str(closeprobe), how], mode_env("module", userspace, fakemod))
    assert r["dev"] >= 3 and r["lfd"] > r["ep"] > r["keep"], r   # the local is in the range
    assert r["open"] == sorted([0, 1, 2, r["dev"], r["keep"], r["lfd"]]) and not r["after_open"], r
    assert r["open_all"] == [0, 1, 2, r["dev"]], r
    assert not r["new_is_dev"] and r["new_closed"], r


SPINPROBE = r"""
#define _GNU_SOURCE
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
/* Module mode, two threads: the main thread spawns the listener's local (epoll_ctl ADD)
 * and stays away; the second blocks in accept().  The local queue is the spawner's (the
 * fake keeps it readable): the second thread must sleep on the listen fd, not spin on
 * the local.  Prints its CPU milliseconds over 500 ms, and whether it got the connection. */
static int l;
static volatile int got = -1;

static void *acceptor(void *arg)
{
	(void)arg;
	got = accept(l, NULL, NULL);
	return NULL;
}

int main(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t al = sizeof(a);
	struct epoll_event ev = { .events = EPOLLIN };
	struct timespec cpu, nap = { 0, 500000000 };
	pthread_t t;
	clockid_t cid;
	int c;

	l = socket(AF_INET, SOCK_STREAM, 0);
	if (l < 0 || bind(l, (void *)&a, sizeof(a)) || listen(l, 16) || getsockname(l, (void *)&a, &al))
		return 2;
	epoll_ctl(epoll_create1(0), EPOLL_CTL_ADD, l, &ev);
	pthread_create(&t, NULL, acceptor, NULL);
	nanosleep(&nap, NULL);
	pthread_getcpuclockid(t, &cid);
	clock_gettime(cid, &cpu);
	c = socket(AF_INET, SOCK_STREAM, 0);
	connect(c, (void *)&a, sizeof(a));
	pthread_join(t, NULL);
	printf("{\"cpu_ms\": %ld, \"accepted\": %d}\n", cpu.tv_sec * 1000 + cpu.tv_nsec / 1000000, got >= 0);
	return 0;
}
"""


@pytest.fixture(scope="module")
def spinprobe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory, "spinprobe", SPINPROBE)


def test_threads_other_than_the_spawner_sleep_instead_of_spinning(userspace: Userspace, fakemod: Path,
                                                                 spinprobe: Path) -> None:
    """Module mode: a local's queue is its spawning thread's. Another thread in a blocking
    accept() used to poll that local too: readable, ACCEPT said EAGAIN (not its queue), so
    it spun at 100% CPU until the spawner accepted (~500 ms of CPU here). It now waits on
    the listen fd (and its 20 ms re-check), and still gets the connection."""
    env = mode_env("module", userspace, fakemod) | {"FAKEMOD_LOCAL_READY": "1"}
    r = run_probe([str(spinprobe)], env)
    assert r["accepted"] == 1 and r["cpu_ms"] < 100, r


DUP3PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
/* dup3 over a tracked listener with flags the kernel refuses: EINVAL, and the listener
 * keeps its tracking (its spawned local, an eventfd of the fake module, stays open). */
/* FD_BY_LINK */
int main(void)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	struct epoll_event ev = { .events = EPOLLIN };
	int l = socket(AF_INET, SOCK_STREAM, 0), other = socket(AF_INET, SOCK_STREAM, 0), ep, lfd, r, err;

	if (l < 0 || bind(l, (void *)&a, sizeof(a)) || listen(l, 8))
		return 2;
	ep = epoll_create1(0);
	epoll_ctl(ep, EPOLL_CTL_ADD, l, &ev);
	lfd = fd_linked("eventfd", ep);
	r = dup3(other, l, O_NONBLOCK);
	err = errno;
	printf("{\"rc\": %d, \"einval\": %d, \"lfd\": %d, \"lfd_open\": %d}\n", r, err == EINVAL, lfd,
	       lfd >= 0 && fcntl(lfd, F_GETFD) >= 0);
	return 0;
}
"""


def test_dup3_with_bad_flags_over_a_listener_changes_nothing(userspace: Userspace, fakemod: Path,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """dup3(old, listener, O_NONBLOCK) fails with EINVAL in the kernel; the library used to
    drop the listener's tracking first (releasing its local listener) anyway."""
    probe = compile_c(tmp_path_factory, "dup3probe", DUP3PROBE.replace("/* FD_BY_LINK */", FD_BY_LINK))
    r = run_probe([str(probe)], mode_env("module", userspace, fakemod))
    assert r == {"rc": -1, "einval": 1, "lfd": r["lfd"], "lfd_open": 1} and r["lfd"] > 0, r
