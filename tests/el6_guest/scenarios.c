/*
 * el6 guest scenarios for issue 10 (tests/test_el6_guest.py boots the el6 bzImage with
 * this program, musl static, as the initramfs's test): fastsocket.ko loaded with
 * enable_listen_spawn=1 (this program pins itself), loopback only, 4 vCPUs.
 *
 * Usage: scenarios NAME...   Each prints "SCENARIO <name> PASS|FAIL <detail>".
 *   lsm           LISTEN/ACCEPT/SHUTDOWN/SPAWN pass security_socket_* (kprobe events),
 *                 and the local SPAWN creates is made in the caller's context (kern=0)
 *   plain_accept  connections queued on CPU 1's local reach plain accept() elsewhere
 *   worker_exit   connections queued on a CPU whose worker was killed reach the
 *                 worker of another CPU (and new ones too)
 *   wakeups       a connection on CPU 1 wakes only CPU 1's worker (epoll)
 *   ack_cpu       the final ACK arriving on another CPU than the SYN completes
 *   rfd_netns     RFD: another namespace's teardown of the same port keeps steering
 *   rfd_steered   RFD: packets already on their CPU are not counted as steered
 *   options       a connection accepted through a local has the options of one from a
 *                 plain listener (priority, keepalive, MSS, congestion control, MD5 key)
 *   repin         connections arriving on the CPU a worker was re-pinned away from
 *                 reach it (its epoll entry still waits on the old CPU's local)
 *   repin_queued  connections queued on a worker's CPU before it is re-pinned (and
 *                 polled once from its new CPU before it spawns there) reach it
 *   close_kinds   CLOSE refuses every fd but a TCP socket (device, pipe: ENOTSOCK; unix,
 *                 UDP: EOPNOTSUPP) and leaves it open; a TCP socket it closes
 *   cpu_offline   connections queued on a CPU that goes offline reach another worker
 *                 (run it last: CPU 3 comes back, but its locals are gone)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "fastsocket_abi.h"

#ifndef TCP_MD5SIG
#define TCP_MD5SIG 14
#endif
#ifndef TCP_CONGESTION
#define TCP_CONGESTION 13
#endif

struct md5sig {			/* struct tcp_md5sig of linux/tcp.h */
	struct sockaddr_storage addr;
	unsigned short pad1, keylen;
	unsigned int pad2;
	unsigned char key[80];
};

/* Per scenario: a hung one is killed after this and reported, the run goes on. */
#define SCENARIO_TIMEOUT_MS 60000

static int dev = -1;
static int next_port = 7100;

static int result(const char *name, int ok, const char *fmt, ...)
{
	char detail[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	printf("SCENARIO %s %s %s\n", name, ok ? "PASS" : "FAIL", detail);
	fflush(stdout);
	return ok ? 0 : 1;
}

static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		perror("sched_setaffinity");
	sched_yield();
}

static void msleep(int ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static int write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_TRUNC);
	int n;

	if (fd < 0)
		return -1;
	n = write(fd, text, strlen(text));
	close(fd);
	return n == (int)strlen(text) ? 0 : -1;
}

static struct sockaddr_in loopback(int port)
{
	struct sockaddr_in a;

	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons(port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return a;
}

/* A global listen socket on a fresh port: socket(2) + bind + LISTEN ioctl. */
static int global_listener(int *port)
{
	struct fsock_listen_args la;
	struct sockaddr_in a;
	int fd, one = 1;

	fd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	*port = next_port++;
	a = loopback(*port);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)))
		perror("bind");
	la.fd = fd;
	la.backlog = 128;
	if (ioctl(dev, FSOCK_IOC_LISTEN, &la))
		perror("LISTEN");
	return fd;
}

static int spawn(int fd, int cpu)
{
	struct fsock_spawn_args sa = { fd, cpu, -1, 0 };

	return ioctl(dev, FSOCK_IOC_SPAWN, &sa);
}

static int fs_accept(int fd)
{
	struct fsock_accept_args aa;

	memset(&aa, 0, sizeof(aa));
	aa.fd = fd;
	aa.flags = SOCK_NONBLOCK;
	if (ioctl(dev, FSOCK_IOC_ACCEPT, &aa))
		return -1;
	return aa.new_fd;
}

/* A child pinned to `cpu` opens n connections to port and keeps them open; its pid. */
static pid_t clients(int cpu, int port, int n)
{
	int p[2], i;
	pid_t pid;
	char c;

	if (pipe(p))
		return -1;
	pid = fork();
	if (pid == 0) {
		struct sockaddr_in a = loopback(port);

		pin(cpu);
		for (i = 0; i < n; i++) {
			int fd = socket(AF_INET, SOCK_STREAM, 0);

			if (connect(fd, (struct sockaddr *)&a, sizeof(a)))
				perror("connect");
		}
		c = 1;
		if (write(p[1], &c, 1) != 1)
			_exit(1);
		for (;;)
			pause();
	}
	close(p[1]);
	if (read(p[0], &c, 1) != 1)
		perror("clients");
	close(p[0]);
	msleep(100);		/* the handshakes complete in softirq */
	return pid;
}

static void reap(pid_t pid)
{
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

/* Column `col` (1 = local_lookups ... 5 = steered) of /proc/net/fastsocket; cpu -1: sum. */
static unsigned long stat_col(int cpu, int col)
{
	unsigned long v[5], sum = 0;
	char line[256];
	FILE *f = fopen("/proc/net/fastsocket", "r");
	int c;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "cpu%d %lu %lu %lu %lu %lu", &c, &v[0], &v[1], &v[2], &v[3],
			   &v[4]) == 6 && (cpu < 0 || c == cpu))
			sum += v[col - 1];
	fclose(f);
	return sum;
}

/* ---- items 2, 3: LSM hooks ---------------------------------------------------------- */

static int count_lines(const char *text, const char *a, const char *b)
{
	const char *p = text, *nl;
	int n = 0;

	while (*p) {
		nl = strchr(p, '\n');
		if (!nl)
			nl = p + strlen(p);
		if (memmem(p, nl - p, a, strlen(a)) && (!b || memmem(p, nl - p, b, strlen(b))))
			n++;
		p = *nl ? nl + 1 : nl;
	}
	return n;
}

static char *read_trace(void)
{
	static char buf[1 << 16];
	int fd = open("/sys/kernel/debug/tracing/trace", O_RDONLY), n, len = 0;

	if (fd < 0)
		return NULL;
	while ((n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += n;
	buf[len] = 0;
	close(fd);
	return buf;
}

static int scenario_lsm(void)
{
	const char *T = "/sys/kernel/debug/tracing/";
	char path[128], *trace;
	int port, g, c, n_listen, n_accept, n_shut, n_kern, n_user;
	pid_t cl;

	mkdir("/sys/kernel/debug", 0755);
	if (access("/sys/kernel/debug/tracing", F_OK) &&
	    system("mount -t debugfs none /sys/kernel/debug") != 0)
		return result("lsm", 0, "no debugfs");
	snprintf(path, sizeof(path), "%skprobe_events", T);
	/* x86_64: 5th argument in r8 (security_socket_post_create's kern) */
	if (write_file(path, "p:fsl security_socket_listen\n") ||
	    system("echo 'p:fsa security_socket_accept' >> /sys/kernel/debug/tracing/kprobe_events") ||
	    system("echo 'p:fss security_socket_shutdown' >> /sys/kernel/debug/tracing/kprobe_events") ||
	    system("echo 'p:fsc security_socket_post_create family=%si:s32 type=%dx:s32 kern=%r8:s32' >> "
		   "/sys/kernel/debug/tracing/kprobe_events"))
		return result("lsm", 0, "cannot define kprobe events");
	snprintf(path, sizeof(path), "%sevents/kprobes/enable", T);
	write_file(path, "1");
	snprintf(path, sizeof(path), "%strace", T);
	write_file(path, "");

	pin(1);
	g = global_listener(&port);			/* LISTEN: security_socket_listen */
	trace = read_trace();
	n_listen = trace ? count_lines(trace, "fsl:", NULL) : -1;
	write_file(path, "");
	if (spawn(g, 1))
		return result("lsm", 0, "SPAWN: %s", strerror(errno));
	trace = read_trace();
	/* the local: socket() in the caller's context, bind + listen checks */
	n_kern = trace ? count_lines(trace, "fsc:", "kern=1") : -1;
	n_user = trace ? count_lines(trace, "fsc:", "kern=0") : -1;
	n_listen += trace ? count_lines(trace, "fsl:", NULL) : 0;
	write_file(path, "");
	cl = clients(1, port, 1);
	c = fs_accept(g);
	trace = read_trace();
	n_accept = trace ? count_lines(trace, "fsa:", NULL) : -1;
	{
		struct fsock_shutdown_args sh = { g, SHUT_RDWR };

		write_file(path, "");
		ioctl(dev, FSOCK_IOC_SHUTDOWN, &sh);
		trace = read_trace();
		n_shut = trace ? count_lines(trace, "fss:", NULL) : -1;
	}
	reap(cl);
	close(c);
	close(g);
	snprintf(path, sizeof(path), "%sevents/kprobes/enable", T);
	write_file(path, "0");
	return result("lsm", c >= 0 && n_listen >= 2 && n_accept >= 1 && n_shut >= 1 &&
		      n_kern == 0 && n_user >= 1,
		      "accepted=%d listen_checks=%d accept_checks=%d shutdown_checks=%d "
		      "spawn_kern_sockets=%d spawn_user_sockets=%d", c >= 0, n_listen,
		      n_accept, n_shut, n_kern, n_user);
}

/* ---- item 8: orphaned locals ------------------------------------------------------ */

static int scenario_plain_accept(void)
{
	int port, g, got = 0, fd, status;
	unsigned long before = stat_col(1, 1);
	pid_t cl, child;

	pin(1);
	g = global_listener(&port);
	if (spawn(g, 1))
		return result("plain_accept", 0, "SPAWN: %s", strerror(errno));
	cl = clients(1, port, 4);
	/* an exec'd child or a dup'd fd: plain accept(2) on another CPU */
	child = fork();
	if (child == 0) {
		int n = 0, d = dup(g);

		pin(2);
		/* accept4's SOCK_NONBLOCK is the new socket's flag: the listener itself
		 * must not block once the queues are empty */
		fcntl(d, F_SETFL, fcntl(d, F_GETFL) | O_NONBLOCK);
		while ((fd = accept4(d, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
			n++;
			close(fd);
		}
		_exit(n);
	}
	waitpid(child, &status, 0);
	got = WEXITSTATUS(status);
	reap(cl);
	close(g);
	return result("plain_accept", got == 4, "accepted=%d of 4 local_lookups_cpu1=%lu", got,
		      stat_col(1, 1) - before);
}

/* Voluntary context switches of this process so far: each time it was woken from a
 * sleep, including wakeups epoll swallows (woken, re-polled, nothing ready, asleep). */
static long voluntary_switches(void)
{
	char line[128];
	long v = -1;
	FILE *f = fopen("/proc/self/status", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "voluntary_ctxt_switches: %ld", &v) == 1)
			break;
	fclose(f);
	return v;
}

/* A worker pinned to `cpu`: SPAWN, epoll on the global, ACCEPT what it is woken for;
 * reports "wakeups accepts switches" on `out` after `ms` ms (switches: voluntary
 * context switches while it waited).  accept_it 0: never accepts. */
static pid_t worker(int g, int cpu, int ms, int accept_it, int out)
{
	struct epoll_event ev = { EPOLLIN, { 0 } };
	int ep, n, wakes = 0, accepts = 0, fd;
	long switches;
	struct timespec t0, t;
	char line[64];
	pid_t pid;

	pid = fork();
	if (pid)
		return pid;
	pin(cpu);
	if (spawn(g, cpu))
		perror("SPAWN");
	ep = epoll_create(1);
	ev.data.fd = g;
	epoll_ctl(ep, EPOLL_CTL_ADD, g, &ev);
	if (write(out, "r", 1) != 1)
		_exit(1);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	switches = voluntary_switches();
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &t);
		n = ms - (int)((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000);
		if (n <= 0)
			break;
		if (!accept_it) {
			msleep(n);
			break;
		}
		if (epoll_wait(ep, &ev, 1, n) <= 0)
			continue;
		wakes++;
		while ((fd = fs_accept(g)) >= 0) {
			accepts++;
			close(fd);
		}
	}
	switches = voluntary_switches() - switches;
	snprintf(line, sizeof(line), "%d %d %ld\n", wakes, accepts, switches);
	if (write(out, line, strlen(line)) < 0)
		_exit(1);
	_exit(0);
}

static void worker_ready(int in)
{
	char c;

	if (read(in, &c, 1) != 1)
		perror("worker");
}

static void worker_report_all(int in, int *wakes, int *accepts, long *switches)
{
	char line[64];
	int n = 0;

	memset(line, 0, sizeof(line));
	while (n < (int)sizeof(line) - 1 && read(in, line + n, 1) == 1 && line[n] != '\n')
		n++;
	if (sscanf(line, "%d %d %ld", wakes, accepts, switches) != 3)
		*wakes = *accepts = *switches = -1;
}

static void worker_report(int in, int *wakes, int *accepts)
{
	long switches;

	worker_report_all(in, wakes, accepts, &switches);
}

static int scenario_worker_exit(void)
{
	int port, g, pa[2], pb[2], wakes, accepts;
	pid_t a, b, cl1, cl2;

	pin(0);
	g = global_listener(&port);
	if (pipe(pa) || pipe(pb))
		return result("worker_exit", 0, "pipe");
	a = worker(g, 1, 60000, 0, pa[1]);	/* spawns on CPU 1, never accepts */
	worker_ready(pa[0]);
	b = worker(g, 2, 4000, 1, pb[1]);
	worker_ready(pb[0]);
	cl1 = clients(1, port, 3);		/* queued on CPU 1's local */
	reap(a);				/* its worker dies */
	msleep(1000);
	cl2 = clients(1, port, 2);		/* and new ones after it died */
	worker_report(pb[0], &wakes, &accepts);
	waitpid(b, NULL, 0);
	reap(cl1);
	reap(cl2);
	close(g);
	return result("worker_exit", accepts == 5, "accepted_by_cpu2=%d of 5 wakeups=%d",
		      accepts, wakes);
}

/* Accept through the global while epoll reports it, up to `want` connections (~4 s). */
static int epoll_drain(int ep, int g, int want)
{
	struct epoll_event ev;
	int i, fd, accepts = 0;

	for (i = 0; i < 20 && accepts < want; i++) {
		if (epoll_wait(ep, &ev, 1, 200) <= 0)
			continue;
		while ((fd = fs_accept(g)) >= 0) {
			accepts++;
			close(fd);
		}
	}
	return accepts;
}

/* The only worker of the global is re-pinned from CPU 1 to CPU 2 after it spawned and
 * registered its epoll there (and spawns again on CPU 2, as the library does): the
 * connections that still arrive on CPU 1 must reach it. */
static int scenario_repin(void)
{
	struct epoll_event ev = { EPOLLIN, { 0 } };
	int port, g, ep, accepts;
	pid_t cl;

	pin(0);
	g = global_listener(&port);
	pin(1);
	spawn(g, 1);
	ep = epoll_create(1);
	ev.data.fd = g;
	epoll_ctl(ep, EPOLL_CTL_ADD, g, &ev);
	pin(2);
	spawn(g, 2);
	cl = clients(1, port, 3);
	accepts = epoll_drain(ep, g, 3);
	reap(cl);
	close(ep);
	close(g);
	return result("repin", accepts == 3, "accepted_after_repin=%d of 3", accepts);
}

/* Connections queued on CPU 1 while its worker waits there; the worker is re-pinned to
 * CPU 2 and polls once from there before it spawns (its level-triggered epoll drops the
 * event then: CPU 1's local still has an acceptor): the spawn on CPU 2 must bring them
 * back, with no new connection on CPU 1 to wake it. */
static int scenario_repin_queued(void)
{
	struct epoll_event ev = { EPOLLIN, { 0 } };
	int port, g, ep, accepts, early;
	pid_t cl;

	pin(0);
	g = global_listener(&port);
	pin(1);
	spawn(g, 1);
	ep = epoll_create(1);
	ev.data.fd = g;
	epoll_ctl(ep, EPOLL_CTL_ADD, g, &ev);
	cl = clients(1, port, 3);
	early = epoll_wait(ep, &ev, 1, 200);	/* reported on CPU 1, not accepted */
	pin(2);
	epoll_wait(ep, &ev, 1, 200);		/* not reported from CPU 2 yet */
	spawn(g, 2);
	accepts = epoll_drain(ep, g, 3);
	reap(cl);
	close(ep);
	close(g);
	return result("repin_queued", early == 1 && accepts == 3,
		      "reported_on_cpu1=%d accepted_after_repin=%d of 3", early, accepts);
}

/* A CPU with queued connections goes offline: another CPU's worker takes them. */
static int scenario_cpu_offline(void)
{
	int port, g, pa[2], pb[2], wakes, accepts, off;
	pid_t a, b, cl;

	pin(0);
	g = global_listener(&port);
	if (pipe(pa) || pipe(pb))
		return result("cpu_offline", 0, "pipe");
	a = worker(g, 3, 60000, 0, pa[1]);	/* spawns on CPU 3, never accepts */
	worker_ready(pa[0]);
	b = worker(g, 2, 5000, 1, pb[1]);
	worker_ready(pb[0]);
	cl = clients(3, port, 3);		/* queued on CPU 3's local */
	off = write_file("/sys/devices/system/cpu/cpu3/online", "0");
	worker_report(pb[0], &wakes, &accepts);
	waitpid(b, NULL, 0);
	reap(a);
	reap(cl);
	close(g);
	write_file("/sys/devices/system/cpu/cpu3/online", "1");
	return result("cpu_offline", off == 0 && accepts == 3,
		      "offline=%s accepted_by_cpu2=%d of 3 wakeups=%d", off ? "failed" : "ok",
		      accepts, wakes);
}

/* ---- item 10: wake only the local acceptor ---------------------------------------- */

/*
 * 20 connections on CPU 1: CPU 1's worker accepts them all, and the workers of CPUs 2
 * and 3 are never woken.  epoll_wait hides a herd (a woken waiter re-polls, finds
 * nothing on its CPU and sleeps again without returning), so wakeups are counted as
 * voluntary context switches: an undisturbed worker has at most its epoll timeout's.
 */
static int scenario_wakeups(void)
{
	int port, g, p[4][2], cpu, wakes[4], accepts[4], ok;
	long switches[4];
	pid_t w[4], cl;

	pin(0);
	g = global_listener(&port);
	for (cpu = 1; cpu < 4; cpu++) {
		if (pipe(p[cpu]))
			return result("wakeups", 0, "pipe");
		w[cpu] = worker(g, cpu, 3000, 1, p[cpu][1]);
		worker_ready(p[cpu][0]);
	}
	msleep(200);
	cl = clients(1, port, 20);
	for (cpu = 1; cpu < 4; cpu++) {
		worker_report_all(p[cpu][0], &wakes[cpu], &accepts[cpu], &switches[cpu]);
		waitpid(w[cpu], NULL, 0);
	}
	reap(cl);
	close(g);
	ok = accepts[1] == 20 && wakes[2] == 0 && wakes[3] == 0 &&
	     switches[2] >= 0 && switches[2] <= 3 && switches[3] >= 0 && switches[3] <= 3;
	return result("wakeups", ok,
		      "cpu1: wakeups=%d accepts=%d switches=%ld; cpu2: wakeups=%d switches=%ld; "
		      "cpu3: wakeups=%d switches=%ld", wakes[1], accepts[1], switches[1],
		      wakes[2], switches[2], wakes[3], switches[3]);
}

/* ---- item 9: the final ACK on another CPU ------------------------------------------ */

static int scenario_ack_cpu(void)
{
	int port, g, i, ok = 0, resets = 0, c, s, one = 5;
	struct sockaddr_in a;
	char byte;

	pin(1);
	g = global_listener(&port);
	spawn(g, 1);
	pin(2);
	spawn(g, 2);
	a = loopback(port);
	for (i = 0; i < 10; i++) {
		pin(1);
		c = socket(AF_INET, SOCK_STREAM, 0);
		/* a client with TCP_DEFER_ACCEPT holds back the final ACK until it sends */
		setsockopt(c, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof(one));
		if (connect(c, (struct sockaddr *)&a, sizeof(a))) {
			close(c);
			continue;
		}
		pin(2);
		if (write(c, "x", 1) != 1) {	/* ACK + data leave from CPU 2 */
			close(c);
			continue;
		}
		msleep(50);
		s = fs_accept(g);
		if (s >= 0 && read(s, &byte, 1) == 1 && byte == 'x')
			ok++;
		if (recv(c, &byte, 1, MSG_DONTWAIT) < 0 && errno == ECONNRESET)
			resets++;
		if (s >= 0)
			close(s);
		close(c);
	}
	close(g);
	return result("ack_cpu", ok == 10 && resets == 0, "completed=%d of 10 resets=%d", ok,
		      resets);
}

/* ---- item 18: RFD ----------------------------------------------------------------- */

/* Client on `ccpu`, server child on `scpu` sending 20 segments; steered delta. */
static int rfd_flow(int ccpu, int scpu, int other_netns, int *cport, unsigned long *delta)
{
	struct sockaddr_in a, me;
	socklen_t len = sizeof(me);
	int port, l, c, s, i, one = 1, status;
	unsigned long before;
	char buf[64];
	pid_t pid;

	l = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	port = next_port++;
	a = loopback(port);
	if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 8))
		return -1;
	pin(ccpu);
	c = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(c, (struct sockaddr *)&a, sizeof(a)))
		return -1;
	getsockname(c, (struct sockaddr *)&me, &len);
	*cport = ntohs(me.sin_port);
	s = accept(l, NULL, NULL);
	if (other_netns) {
		/* another namespace binds the same port and lets it go again */
		pid = fork();
		if (pid == 0) {
			struct sockaddr_in any;
			int b;

			if (unshare(CLONE_NEWNET))
				_exit(2);
			memset(&any, 0, sizeof(any));
			any.sin_family = AF_INET;
			any.sin_port = htons(*cport);
			b = socket(AF_INET, SOCK_STREAM, 0);
			if (bind(b, (struct sockaddr *)&any, sizeof(any)))
				_exit(3);
			close(b);
			_exit(0);
		}
		waitpid(pid, &status, 0);
		if (WEXITSTATUS(status))
			return -WEXITSTATUS(status);
		msleep(200);
	}
	pin(scpu);
	msleep(20);
	before = stat_col(-1, 5);
	for (i = 0; i < 20; i++) {
		if (write(s, "0123456789", 10) != 10 || read(c, buf, 10) <= 0)
			return -1;
	}
	*delta = stat_col(-1, 5) - before;
	close(s);
	close(c);
	close(l);
	return 0;
}

static int scenario_rfd_netns(void)
{
	unsigned long delta = 0;
	int cport = 0, err;

	write_file("/sys/module/fastsocket/parameters/enable_receive_flow_deliver", "1");
	err = rfd_flow(1, 0, 1, &cport, &delta);
	write_file("/sys/module/fastsocket/parameters/enable_receive_flow_deliver", "0");
	if (err)
		return result("rfd_netns", 0, "flow failed (%d)", err);
	return result("rfd_netns", (cport & 3) == 1 && delta >= 10,
		      "client_port=%d (cpu %d) steered_after_other_netns=%lu", cport, cport & 3,
		      delta);
}

static int scenario_rfd_steered(void)
{
	unsigned long delta = 0;
	int cport = 0, err;

	write_file("/sys/module/fastsocket/parameters/enable_receive_flow_deliver", "1");
	err = rfd_flow(1, 1, 0, &cport, &delta);
	write_file("/sys/module/fastsocket/parameters/enable_receive_flow_deliver", "0");
	if (err)
		return result("rfd_steered", 0, "flow failed (%d)", err);
	return result("rfd_steered", (cport & 3) == 1 && delta == 0,
		      "client_port=%d server_on_cpu1 steered=%lu (nothing moved)", cport, delta);
}

/* ---- item 17: options ------------------------------------------------------------- */

struct child_opts {
	int priority, keepalive, keepidle, mss;
	char cc[16];
};

/* A listener on a fresh port with the options under test (and a TCP MD5 key for
 * 127.0.0.1, which its clients must then sign with). */
static int options_listener(int *port, struct md5sig *md5)
{
	int g = global_listener(port), prio = 5, idle = 77, mss = 1000, one = 1;

	setsockopt(g, SOL_SOCKET, SO_PRIORITY, &prio, sizeof(prio));
	setsockopt(g, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
	setsockopt(g, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
	setsockopt(g, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss));
	setsockopt(g, IPPROTO_TCP, TCP_CONGESTION, "reno", 4);
	if (setsockopt(g, IPPROTO_TCP, TCP_MD5SIG, md5, sizeof(*md5)))
		perror("TCP_MD5SIG");
	return g;
}

/* Connect (signed) from this CPU, accept through the module, read the child's options;
 * -1 when no connection came through. */
static int options_child(int g, int port, struct md5sig *md5, struct child_opts *o)
{
	struct sockaddr_in a = loopback(port);
	struct pollfd pfd;
	socklen_t len;
	int c, s;

	c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	setsockopt(c, IPPROTO_TCP, TCP_MD5SIG, md5, sizeof(*md5));
	connect(c, (struct sockaddr *)&a, sizeof(a));
	pfd.fd = c;
	pfd.events = POLLOUT;
	poll(&pfd, 1, 3000);
	msleep(50);
	s = fs_accept(g);
	if (s < 0) {
		close(c);
		return -1;
	}
	memset(o, 0, sizeof(*o));
	len = sizeof(int);
	getsockopt(s, SOL_SOCKET, SO_PRIORITY, &o->priority, &len);
	getsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &o->keepalive, &len);
	getsockopt(s, IPPROTO_TCP, TCP_KEEPIDLE, &o->keepidle, &len);
	getsockopt(s, IPPROTO_TCP, TCP_MAXSEG, &o->mss, &len);
	len = sizeof(o->cc) - 1;
	getsockopt(s, IPPROTO_TCP, TCP_CONGESTION, o->cc, &len);
	close(s);
	close(c);
	return 0;
}

/*
 * A connection accepted through a local must look exactly like one accepted from a
 * plain listener with the same options (the reference: no local), and the options
 * 2.6.32 children inherit must be there (keepalive, TCP_KEEPIDLE, TCP_MAXSEG; the MD5
 * key: an unsigned listener drops signed SYNs).  2.6.32 children never inherit
 * SO_PRIORITY or TCP_CONGESTION (sk_clone zeroes the one, the other goes back to the
 * default): the comparison, not a fixed value, decides those.
 */
static int scenario_options(void)
{
	struct child_opts ref, loc;
	int port, g, same, inherited;
	unsigned long before;
	struct sockaddr_in a;
	struct md5sig md5;

	memset(&md5, 0, sizeof(md5));
	a = loopback(0);
	memcpy(&md5.addr, &a, sizeof(a));
	md5.keylen = 8;
	memcpy(md5.key, "fsk-test", 8);
	pin(1);
	g = options_listener(&port, &md5);		/* the reference: no local */
	if (options_child(g, port, &md5, &ref))
		return result("options", 0, "no connection through the plain listener");
	close(g);
	g = options_listener(&port, &md5);
	if (spawn(g, 1))
		return result("options", 0, "SPAWN: %s", strerror(errno));
	before = stat_col(1, 3);
	if (options_child(g, port, &md5, &loc)) {
		close(g);
		return result("options", 0, "no connection through the local (MD5 key?)");
	}
	close(g);
	same = ref.priority == loc.priority && ref.keepalive == loc.keepalive &&
	       ref.keepidle == loc.keepidle && ref.mss == loc.mss && !strcmp(ref.cc, loc.cc);
	inherited = loc.keepalive == 1 && loc.keepidle == 77 && loc.mss <= 1000;
	return result("options", same && inherited && stat_col(1, 3) - before == 1,
		      "local: priority=%d keepalive=%d keepidle=%d mss=%d congestion=%s; "
		      "plain: priority=%d keepalive=%d keepidle=%d mss=%d congestion=%s; "
		      "local_accepts=%lu", loc.priority, loc.keepalive, loc.keepidle, loc.mss,
		      loc.cc, ref.priority, ref.keepalive, ref.keepidle, ref.mss, ref.cc,
		      stat_col(1, 3) - before);
}

/* CLOSE of fd: 0, else the errno; *kept: the fd is still open afterwards. */
static int close_ioctl(int fd, int *kept)
{
	struct fsock_close_args c = { .fd = fd };
	int err = ioctl(dev, FSOCK_IOC_CLOSE, &c) ? errno : 0;

	*kept = fcntl(fd, F_GETFD) >= 0;
	return err;
}

static int scenario_close_kinds(void)
{
	struct fsock_socket_args s = { AF_INET, SOCK_STREAM, 0, -1 };
	static const char *const kinds[] = { "the device", "a pipe", "a unix socket", "a udp socket" };
	static const int want[] = { ENOTSOCK, ENOTSOCK, EOPNOTSUPP, EOPNOTSUPP };
	int fds[4], p[2], i, err, kept;

	if (pipe(p))
		return result("close_kinds", 0, "pipe: %s", strerror(errno));
	fds[0] = dev;
	fds[1] = p[0];
	fds[2] = socket(AF_UNIX, SOCK_STREAM, 0);
	fds[3] = socket(AF_INET, SOCK_DGRAM, 0);
	for (i = 0; i < 4; i++) {
		err = close_ioctl(fds[i], &kept);
		if (err != want[i] || !kept)
			return result("close_kinds", 0, "CLOSE of %s: %s (want %s), fd %s", kinds[i],
				      err ? strerror(err) : "succeeded", strerror(want[i]),
				      kept ? "kept" : "closed");
	}
	if (ioctl(dev, FSOCK_IOC_SOCKET, &s))
		return result("close_kinds", 0, "SOCKET: %s", strerror(errno));
	err = close_ioctl(s.fd, &kept);
	return result("close_kinds", !err && !kept, "device, pipe: ENOTSOCK; unix, udp: EOPNOTSUPP; "
		      "TCP socket: %s, fd %s", err ? strerror(err) : "closed", kept ? "kept" : "gone");
}

typedef int (*scenario_fn)(void);

static const struct {
	const char *name;
	scenario_fn fn;
} scenarios[] = {
	{ "lsm", scenario_lsm },
	{ "plain_accept", scenario_plain_accept },
	{ "worker_exit", scenario_worker_exit },
	{ "wakeups", scenario_wakeups },
	{ "ack_cpu", scenario_ack_cpu },
	{ "rfd_netns", scenario_rfd_netns },
	{ "rfd_steered", scenario_rfd_steered },
	{ "options", scenario_options },
	{ "repin", scenario_repin },
	{ "repin_queued", scenario_repin_queued },
	{ "close_kinds", scenario_close_kinds },
	{ "cpu_offline", scenario_cpu_offline },
};

/* Where a hung scenario's process sleeps, for the report (best effort). */
static void show_stack(pid_t pid)
{
	char path[64], buf[2048];
	int fd, n;

	snprintf(path, sizeof(path), "/proc/%d/stack", (int)pid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n > 0) {
		buf[n] = 0;
		printf("stack of %d:\n%s", (int)pid, buf);
	}
}

/*
 * Run one scenario in its own process group with a deadline: a scenario that hangs
 * is reported (FAIL timeout) and killed with everything it forked, and the others
 * still run.  Returns 0 on PASS.
 */
static int run_one(int index, const char *n, scenario_fn fn)
{
	int status, waited;
	pid_t pid;

	pid = fork();
	if (pid == 0) {
		setpgid(0, 0);
		next_port = 7100 + 100 * index;	/* no port shared with another scenario */
		_exit(fn() ? 1 : 0);
	}
	if (pid < 0)
		return result(n, 0, "fork: %s", strerror(errno));
	setpgid(pid, pid);
	for (waited = 0; waited < SCENARIO_TIMEOUT_MS; waited += 100) {
		if (waitpid(pid, &status, WNOHANG) == pid)
			return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
		msleep(100);
	}
	show_stack(pid);
	kill(-pid, SIGKILL);
	waitpid(pid, &status, 0);
	pin(0);
	return result(n, 0, "timeout: hung for %d s (killed)", SCENARIO_TIMEOUT_MS / 1000);
}

int main(int argc, char **argv)
{
	struct fsock_version v;
	int i, j, fails = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	dev = open(FASTSOCKET_DEVICE, O_RDWR);
	if (dev < 0 || ioctl(dev, FSOCK_IOC_VERSION, &v)) {
		printf("SCENARIO setup FAIL no %s: %s\n", FASTSOCKET_DEVICE, strerror(errno));
		return 1;
	}
	for (i = 1; i < argc; i++) {
		for (j = 0; j < (int)(sizeof(scenarios) / sizeof(scenarios[0])); j++)
			if (!strcmp(argv[i], scenarios[j].name))
				break;
		if (j == (int)(sizeof(scenarios) / sizeof(scenarios[0])))
			fails += result(argv[i], 0, "unknown scenario");
		else
			fails += run_one(i, scenarios[j].name, scenarios[j].fn);
	}
	return fails ? 1 : 0;
}
