// SPDX-License-Identifier: GPL-2.0
/*
 * fsock_regress: guest regression scenarios for fastsocket.ko (issue 10), one per run:
 *
 *   fsock_regress <scenario>
 *
 * Needs the module loaded with enable_listen_spawn=2 (fsock_test -m does that), root, at
 * least 3 online CPUs and loopback up. Each scenario restores the parameters it changes.
 * Prints "FSOCK_REGRESS PASS <scenario>" or "FSOCK_REGRESS FAIL <scenario>: <why>".
 *
 *   pin_own      a worker that pinned itself keeps its CPU; SPAWN for another CPU fails
 *   pin_narrow   SPAWN never widens the caller's mask (a CPU outside it: EINVAL)
 *   one_cpu      one worker, two listeners: both locals on the worker's one CPU
 *   addrinuse    a second server on the port gets EADDRINUSE (plain and SOCKET sockets)
 *   unpriv       root master binds port 80, a worker setuid to nobody SPAWNs and accepts
 *   param        enable_listen_spawn 2 -> 0 -> 2 at run time: steering off and on again
 *   churn        a worker exits with connections queued on its local: none is reset
 *   steer        plain shutdown(2) of one local: its CPU's connections reach the global
 *   inherit      accepted connections carry the global's options (priority, keepalive,
 *                buffer size, TCP_MAXSEG, TCP_DEFER_ACCEPT, SO_BINDTODEVICE)
 *   md5filter    a global with TCP_MD5SIG keys: signed connections reach its local (when the
 *                kernel has TCP_MD5SIG); with a socket filter: no local (EOPNOTSUPP)
 *   efault       SOCKET/SPAWN answering to read-only memory: EFAULT, no fd, no local
 *   spawnrace    SPAWN races the close of the same CPU's local (KASAN/refcount splats)
 *   closedev     CLOSE of a non-socket fd (the device itself, a pipe): ENOTSOCK, fd kept;
 *                of a unix or UDP socket: EOPNOTSUPP, fd kept; SHUTDOWN likewise
 *   repin        a worker (epoll on the global and its local fd, as libsocket.so does) is
 *                re-pinned from cpu 1 to 2: cpu 1's new connections reach it, with no
 *                spurious wakeup, and a worker on cpu 3 is never woken (no herd)
 *   repin_spawn  the same with only the global fd in epoll, and the moved worker SPAWNs
 *                again on its new cpu
 *   repin_queued connections queued on cpu 1 (reported there, not accepted) when the
 *                worker is re-pinned reach it on cpu 2 without any new connection
 *   plainaccept  a worker with a local that accepts with plain accept4(2) on the global
 *                (raw syscall, as the stress suite's mixed workers): what poll reports,
 *                accept takes, also after a re-pin
 *   reuseaddr    a SO_REUSEADDR server that closed its connections first (TIME_WAIT) is
 *                restarted on the same port at once, as without Fastsocket (locals inherit
 *                SO_REUSEADDR: the stress suite's "Address in use" cascade)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <sys/epoll.h>
#include <time.h>

#include "../fastsocket_abi.h"

static const char *g_name = "?";
static int g_dev = -1;

static void fail(const char *fmt, ...)
{
	va_list ap;
	int e = errno;

	va_start(ap, fmt);
	printf("FSOCK_REGRESS FAIL %s: ", g_name);
	vprintf(fmt, ap);
	printf(" (errno %d %s)\n", e, strerror(e));
	va_end(ap);
	fflush(stdout);
	_exit(1);
}

static void pin_to(int cpu)
{
	cpu_set_t s;

	CPU_ZERO(&s);
	CPU_SET(cpu, &s);
	if (sched_setaffinity(0, sizeof(s), &s))
		fail("sched_setaffinity %d", cpu);
}

static void unpin(int ncpu)
{
	cpu_set_t s;
	int i;

	CPU_ZERO(&s);
	for (i = 0; i < ncpu; i++)
		CPU_SET(i, &s);
	sched_setaffinity(0, sizeof(s), &s);
}

static int mask_weight(int *only)
{
	cpu_set_t s;

	if (sched_getaffinity(0, sizeof(s), &s))
		fail("sched_getaffinity");
	if (only) {
		*only = -1;
		for (int i = 0; i < CPU_SETSIZE; i++)
			if (CPU_ISSET(i, &s))
				*only = i;
	}
	return CPU_COUNT(&s);
}

static void set_param(const char *name, const char *val)
{
	char path[128];
	int fd;

	snprintf(path, sizeof(path), "/sys/module/fastsocket/parameters/%s", name);
	fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, val, strlen(val)) != (ssize_t)strlen(val))
		fail("writing %s=%s", name, val);
	close(fd);
}

static void set_sysctl(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0 || write(fd, val, strlen(val)) != (ssize_t)strlen(val))
		fail("writing %s", path);
	close(fd);
}

static struct sockaddr_in lo_addr(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sa;
}

/* SOCKET, optional setup, bind 127.0.0.1:port (0: any), LISTEN; returns the fd. */
static int fs_listener(int port, void (*setup)(int fd), int *bound)
{
	struct fsock_socket_args so = { .family = AF_INET, .type = SOCK_STREAM | SOCK_CLOEXEC };
	struct sockaddr_in sa = lo_addr(port);
	socklen_t len = sizeof(sa);

	if (ioctl(g_dev, FSOCK_IOC_SOCKET, &so))
		fail("SOCKET");
	if (setup)
		setup(so.fd);
	if (bind(so.fd, (struct sockaddr *)&sa, sizeof(sa)))
		fail("bind port %d", port);
	struct fsock_listen_args li = { .fd = so.fd, .backlog = 64 };

	if (ioctl(g_dev, FSOCK_IOC_LISTEN, &li))
		fail("LISTEN");
	getsockname(so.fd, (struct sockaddr *)&sa, &len);
	if (bound)
		*bound = ntohs(sa.sin_port);
	return so.fd;
}

static int spawn(int lfd, int cpu, int *local_fd)
{
	struct fsock_spawn_args sp = { .fd = lfd, .cpu = cpu, .local_fd = -1 };
	int r = ioctl(g_dev, FSOCK_IOC_SPAWN, &sp);

	if (local_fd)
		*local_fd = sp.local_fd;
	return r ? -1 : sp.cpu;
}

static void fs_close(int fd)
{
	struct fsock_close_args cl = { .fd = fd };

	if (ioctl(g_dev, FSOCK_IOC_CLOSE, &cl))
		fail("CLOSE %d", fd);
}

/* Connect from `cpu` (loopback SYNs are processed on the sending CPU). */
static int connect_from(int cpu, int port)
{
	struct sockaddr_in sa = lo_addr(port);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cpu_set_t old;

	sched_getaffinity(0, sizeof(old), &old);
	pin_to(cpu);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
		fail("connect from cpu %d to port %d", cpu, port);
	sched_setaffinity(0, sizeof(old), &old);
	return fd;
}

/* ACCEPT until one comes (up to 2 s); returns the fd. */
static int fs_accept(int lfd)
{
	for (int i = 0; i < 200; i++) {
		struct fsock_accept_args ac = { .fd = lfd, .flags = SOCK_CLOEXEC };

		if (!ioctl(g_dev, FSOCK_IOC_ACCEPT, &ac))
			return ac.new_fd;
		if (errno != EAGAIN)
			fail("ACCEPT");
		usleep(10000);
	}
	errno = ETIMEDOUT;
	fail("ACCEPT: nothing in 2 s");
	return -1;
}

/* Column `col` (0 local_lookups .. 4 steered) of `cpu` in /proc/net/fastsocket. */
static unsigned long stat_of(int cpu, int col)
{
	char line[256];
	unsigned long v[5] = { 0 };
	int c;
	FILE *f = fopen("/proc/net/fastsocket", "r");

	if (!f || !fgets(line, sizeof(line), f))
		fail("/proc/net/fastsocket");
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "cpu%d %lu %lu %lu %lu %lu", &c, &v[0], &v[1], &v[2], &v[3],
			   &v[4]) == 6 && c == cpu)
			break;
	fclose(f);
	return v[col];
}

#define LOCAL_ACCEPTS 2
#define GLOBAL_ACCEPTS 3

/* Connect from `from`, ACCEPT on `acpu`; 1 when it came from that CPU's local socket. */
static int accepted_locally(int lfd, int port, int from, int acpu)
{
	unsigned long before, after;
	int c, a;

	pin_to(acpu);
	before = stat_of(acpu, LOCAL_ACCEPTS);
	c = connect_from(from, port);
	a = fs_accept(lfd);
	after = stat_of(acpu, LOCAL_ACCEPTS);
	close(a);
	close(c);
	return after > before;
}

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;

	if (!d)
		fail("/proc/self/fd");
	while (readdir(d))
		n++;
	closedir(d);
	return n;
}

/* ---- scenarios ------------------------------------------------------------------ */

static void pin_own(int ncpu)
{
	int lfd = fs_listener(0, NULL, NULL), lo, only, cpu;

	pin_to(1);
	cpu = spawn(lfd, -1, &lo);
	if (cpu != 1 || mask_weight(&only) != 1 || only != 1)
		fail("self-pinned worker moved: spawned for cpu %d, now on cpu %d", cpu, only);
	if (spawn(lfd, 2, NULL) >= 0 || errno != EINVAL)
		fail("SPAWN for cpu 2 from a worker pinned to cpu 1");
	if (mask_weight(&only) != 1 || only != 1)
		fail("failed SPAWN changed the mask");
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

static void pin_narrow(int ncpu)
{
	int lfd = fs_listener(0, NULL, NULL), lo, cpu;
	cpu_set_t s;

	CPU_ZERO(&s);
	CPU_SET(1, &s);
	CPU_SET(2, &s);
	if (sched_setaffinity(0, sizeof(s), &s))
		fail("sched_setaffinity {1,2}");
	if (spawn(lfd, 0, NULL) >= 0 || errno != EINVAL)
		fail("SPAWN for cpu 0 outside the mask {1,2} succeeded");
	if (mask_weight(NULL) != 2)
		fail("failed SPAWN changed the mask");
	cpu = spawn(lfd, -1, &lo);
	if (cpu != 1 && cpu != 2)
		fail("SPAWN chose cpu %d outside {1,2}", cpu);
	sched_getaffinity(0, sizeof(s), &s);
	if (CPU_COUNT(&s) != 1 || !CPU_ISSET(cpu, &s))
		fail("not narrowed to cpu %d", cpu);
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

static void one_cpu(int ncpu)
{
	int a = fs_listener(0, NULL, NULL), b = fs_listener(0, NULL, NULL);
	int la, lb, ca, cb, only;

	ca = spawn(a, -1, &la);
	cb = spawn(b, -1, &lb);
	if (ca < 0 || cb < 0)
		fail("SPAWN");
	if (ca != cb || mask_weight(&only) != 1 || only != ca)
		fail("one worker, two listeners: locals on cpu %d and %d, runs on %d", ca, cb, only);
	close(la);
	close(lb);
	fs_close(a);
	fs_close(b);
	unpin(ncpu);
}

static void addrinuse(int ncpu)
{
	struct fsock_socket_args so = { .family = AF_INET, .type = SOCK_STREAM | SOCK_CLOEXEC };
	int port, lfd = fs_listener(0, NULL, &port), plain, lo;
	struct sockaddr_in sa = lo_addr(port);

	if (spawn(lfd, 0, &lo) < 0)
		fail("SPAWN");
	plain = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (!bind(plain, (struct sockaddr *)&sa, sizeof(sa)) || errno != EADDRINUSE)
		fail("plain socket bound the port of a managed listener");
	if (ioctl(g_dev, FSOCK_IOC_SOCKET, &so))
		fail("SOCKET");
	if (!bind(so.fd, (struct sockaddr *)&sa, sizeof(sa)) || errno != EADDRINUSE)
		fail("a second server's SOCKET socket bound the port of a managed listener");
	close(plain);
	close(so.fd);
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

static void unpriv(int ncpu)
{
	int lfd = fs_listener(80, NULL, NULL), st;
	pid_t pid = fork();

	if (pid == 0) {
		int lo, cpu, c, a;
		char ch = 'x';

		if (setgid(65534) || setuid(65534))
			fail("setuid nobody");
		cpu = spawn(lfd, 1, &lo);
		if (cpu != 1 || lo < 0)
			fail("unprivileged worker SPAWN for port 80");
		c = connect_from(1, 80);
		a = fs_accept(lfd);
		if (write(c, &ch, 1) != 1 || read(a, &ch, 1) != 1)
			fail("connection through the worker's local");
		_exit(0);
	}
	if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
		fail("unprivileged worker failed");
	fs_close(lfd);
	unpin(ncpu);
}

static void param(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), lo;

	if (spawn(lfd, 1, &lo) != 1)
		fail("SPAWN cpu 1");
	if (!accepted_locally(lfd, port, 1, 1))
		fail("listen spawn on: not steered to the local");
	set_param("enable_listen_spawn", "0");
	if (accepted_locally(lfd, port, 1, 1)) {
		set_param("enable_listen_spawn", "2");
		fail("enable_listen_spawn=0 at run time: still steered to the local");
	}
	set_param("enable_listen_spawn", "2");
	if (!accepted_locally(lfd, port, 1, 1))
		fail("enable_listen_spawn back to 2: not steered to the local");
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

#define CHURN_CONNS 8

static void churn(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), i, st, c[CHURN_CONNS];
	int ready[2];
	char ch;
	pid_t pid;

	set_sysctl("/proc/sys/net/ipv4/tcp_migrate_req", "0");	/* no help from the kernel */
	if (pipe(ready))
		fail("pipe");
	pid = fork();
	if (pid == 0) {
		int lo;

		if (spawn(lfd, 1, &lo) != 1)
			fail("worker SPAWN cpu 1");
		close(ready[0]);
		(void)!write(ready[1], "r", 1);
		for (;;)
			pause();	/* killed without accepting anything */
	}
	close(ready[1]);
	if (read(ready[0], &ch, 1) != 1)
		fail("worker did not spawn");
	for (i = 0; i < CHURN_CONNS; i++)
		c[i] = connect_from(1, port);	/* queued on the worker's local */
	kill(pid, SIGKILL);
	if (waitpid(pid, &st, 0) != pid)
		fail("waitpid");
	pin_to(0);
	for (i = 0; i < CHURN_CONNS; i++)
		if (write(c[i], "x", 1) != 1)
			fail("write on connection %d", i);
	for (i = 0; i < CHURN_CONNS; i++) {
		int a = fs_accept(lfd);

		if (read(a, &ch, 1) != 1)
			fail("connection %d queued on the dead worker's local was reset", i);
		close(a);
	}
	for (i = 0; i < CHURN_CONNS; i++)
		close(c[i]);
	close(ready[0]);
	fs_close(lfd);
	unpin(ncpu);
}

static void steer(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), lo[4], i;

	for (i = 0; i < 4 && i < ncpu; i++) {
		unpin(ncpu);	/* mode 2: one CPU per worker, this one plays four */
		if (spawn(lfd, i, &lo[i]) != i)
			fail("SPAWN cpu %d", i);
	}
	unpin(ncpu);
	/* Plain shutdown(2): the kernel compacts the group behind the module's back. */
	if (shutdown(lo[1], SHUT_RDWR))
		fail("shutdown of the cpu 1 local");
	if (accepted_locally(lfd, port, 1, 1))
		fail("cpu 1 connection accepted locally after its local was shut down");
	for (i = 0; i < ncpu && i < 4; i++)
		if (i != 1 && !accepted_locally(lfd, port, i, i))
			fail("cpu %d connection not on its local after the group changed", i);
	for (i = 0; i < 4 && i < ncpu; i++)
		close(lo[i]);
	fs_close(lfd);
	unpin(ncpu);
}

static void inherit_setup(int fd)
{
	int prio = 5, idle = 77, buf = 65536, mss = 1000, defer = 3, one = 1;

	if (setsockopt(fd, SOL_SOCKET, SO_PRIORITY, &prio, sizeof(prio)) ||
	    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one)) ||
	    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle)) ||
	    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf)) ||
	    setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &mss, sizeof(mss)) ||
	    setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &defer, sizeof(defer)) ||
	    setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, "lo", 3))
		fail("setting the global's options");
}

static int getint(int fd, int level, int opt)
{
	int v = -1;
	socklen_t l = sizeof(v);

	if (getsockopt(fd, level, opt, &v, &l))
		fail("getsockopt %d/%d", level, opt);
	return v;
}

static void inherit(int ncpu)
{
	int port, lfd = fs_listener(0, inherit_setup, &port), lo, c, a;
	int want_buf = getint(lfd, SOL_SOCKET, SO_RCVBUF);
	unsigned long before;
	char dev[16] = "";
	socklen_t dl = sizeof(dev);

	if (spawn(lfd, 1, &lo) != 1)
		fail("SPAWN cpu 1");
	before = stat_of(1, LOCAL_ACCEPTS);
	c = connect_from(1, port);
	if (write(c, "x", 1) != 1)	/* TCP_DEFER_ACCEPT: queued once data came */
		fail("write");
	a = fs_accept(lfd);
	if (stat_of(1, LOCAL_ACCEPTS) != before + 1)
		fail("not accepted from the cpu 1 local");
	getsockopt(a, SOL_SOCKET, SO_BINDTODEVICE, dev, &dl);
	/* sk_clone_lock() zeroes sk_priority of every accepted child, plain listeners' too:
	 * the local itself must carry it (checked below), the child cannot. */
	if (!getint(a, SOL_SOCKET, SO_KEEPALIVE) ||
	    getint(a, IPPROTO_TCP, TCP_KEEPIDLE) != 77 ||
	    getint(a, SOL_SOCKET, SO_RCVBUF) != want_buf || strcmp(dev, "lo"))
		fail("accepted socket: keepalive %d keepidle %d rcvbuf %d (want %d) dev '%s'",
		     getint(a, SOL_SOCKET, SO_KEEPALIVE),
		     getint(a, IPPROTO_TCP, TCP_KEEPIDLE), getint(a, SOL_SOCKET, SO_RCVBUF),
		     want_buf, dev);
	if (getint(lo, SOL_SOCKET, SO_PRIORITY) != 5 || getint(lo, IPPROTO_TCP, TCP_MAXSEG) != 1000 ||
	    getint(lo, IPPROTO_TCP, TCP_DEFER_ACCEPT) <= 0)
		fail("local socket: priority %d maxseg %d defer_accept %d",
		     getint(lo, SOL_SOCKET, SO_PRIORITY), getint(lo, IPPROTO_TCP, TCP_MAXSEG), getint(lo, IPPROTO_TCP, TCP_DEFER_ACCEPT));
	close(a);
	close(c);
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

static void md5_key(int fd, int *supported)
{
	struct tcp_md5sig k = { .tcpm_keylen = 6 };
	struct sockaddr_in *sa = (struct sockaddr_in *)&k.tcpm_addr;

	sa->sin_family = AF_INET;
	sa->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	memcpy(k.tcpm_key, "secret", 6);
	*supported = !setsockopt(fd, IPPROTO_TCP, TCP_MD5SIG, &k, sizeof(k));
	if (!*supported && errno != ENOPROTOOPT)
		fail("TCP_MD5SIG");
}

static int g_md5;

/* Classic BPF as SO_ATTACH_FILTER takes it (no kernel headers needed). */
struct cbpf_insn {
	uint16_t code;
	uint8_t jt, jf;
	uint32_t k;
};

struct cbpf_prog {
	unsigned short len;
	struct cbpf_insn *filter;
};

#ifndef SO_ATTACH_FILTER
#define SO_ATTACH_FILTER 26
#endif

static void md5_setup(int fd)
{
	md5_key(fd, &g_md5);
}

static void md5filter(int ncpu)
{
	struct cbpf_insn all = { .code = 0x06, .k = 0xffff };	/* ret #0xffff: keep all */
	struct cbpf_prog prog = { .len = 1, .filter = &all };
	int port, lfd = fs_listener(0, md5_setup, &port), lo, c, ok;

	if (g_md5) {
		struct sockaddr_in sa = lo_addr(port);
		struct pollfd p;

		if (spawn(lfd, 1, &lo) != 1)
			fail("SPAWN with TCP_MD5SIG keys");
		c = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
		md5_key(c, &ok);
		pin_to(1);
		if (connect(c, (struct sockaddr *)&sa, sizeof(sa)) && errno != EINPROGRESS)
			fail("connect");
		p = (struct pollfd){ .fd = c, .events = POLLOUT };
		if (poll(&p, 1, 3000) != 1 || getint(c, SOL_SOCKET, SO_ERROR))
			fail("signed connection not answered: the local lacks the key");
		close(fs_accept(lfd));
		close(c);
		close(lo);
		unpin(ncpu);
	} else {
		printf("TCP_MD5SIG not in this kernel: key inheritance not exercised\n");
	}
	fs_close(lfd);
	lfd = fs_listener(0, NULL, NULL);
	if (setsockopt(lfd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)))
		fail("SO_ATTACH_FILTER");
	if (spawn(lfd, 1, NULL) >= 0 || errno != EOPNOTSUPP)
		fail("SPAWN of a global with a socket filter: a local would bypass it");
	fs_close(lfd);
	unpin(ncpu);
}

static void efault(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), n;
	long pg = sysconf(_SC_PAGESIZE);
	char *ro = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct fsock_spawn_args sp = { .fd = lfd, .cpu = 1, .local_fd = -1 };
	struct fsock_socket_args so = { .family = AF_INET, .type = SOCK_STREAM };

	if (ro == MAP_FAILED)
		fail("mmap");
	memcpy(ro, &sp, sizeof(sp));
	memcpy(ro + 64, &so, sizeof(so));
	if (mprotect(ro, pg, PROT_READ))
		fail("mprotect");
	n = count_fds();
	if (!ioctl(g_dev, FSOCK_IOC_SOCKET, ro + 64) || errno != EFAULT)
		fail("SOCKET into read-only memory did not fail with EFAULT");
	if (!ioctl(g_dev, FSOCK_IOC_SPAWN, ro) || errno != EFAULT)
		fail("SPAWN into read-only memory did not fail with EFAULT");
	if (count_fds() != n)
		fail("EFAULT left %d fds behind", count_fds() - n);
	if (mask_weight(NULL) != ncpu)
		fail("failed SPAWN left the caller pinned");
	/* No local either: cpu 1's connections go to the global socket. */
	if (accepted_locally(lfd, port, 1, 1))
		fail("a local socket survived the failed SPAWN");
	munmap(ro, pg);
	fs_close(lfd);
	unpin(ncpu);
}

/* SHUTDOWN takes what CLOSE takes: TCP sockets only (the library falls back to shutdown(2)). */
static void shutdown_kinds(void)
{
	struct fsock_shutdown_args a = { .how = SHUT_RDWR };
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		fail("socketpair");
	a.fd = sv[0];
	if (!ioctl(g_dev, FSOCK_IOC_SHUTDOWN, &a) || errno != EOPNOTSUPP)
		fail("SHUTDOWN of a unix socket did not fail with EOPNOTSUPP");
	if (write(sv[0], "x", 1) != 1)
		fail("a refused SHUTDOWN shut the unix socket down");
	close(sv[0]);
	close(sv[1]);
	a.fd = g_dev;
	if (!ioctl(g_dev, FSOCK_IOC_SHUTDOWN, &a) || errno != ENOTSOCK)
		fail("SHUTDOWN of the device fd did not fail with ENOTSOCK");
}

static void closedev(int ncpu)
{
	struct fsock_close_args c = { .fd = g_dev };
	struct fsock_version v;
	int p[2];

	(void)ncpu;
	if (!ioctl(g_dev, FSOCK_IOC_CLOSE, &c) || errno != ENOTSOCK)
		fail("CLOSE of the device fd did not fail with ENOTSOCK");
	if (ioctl(g_dev, FSOCK_IOC_VERSION, &v))
		fail("the device fd is gone after a refused CLOSE");
	if (pipe(p))
		fail("pipe");
	c.fd = p[0];
	if (!ioctl(g_dev, FSOCK_IOC_CLOSE, &c) || errno != ENOTSOCK)
		fail("CLOSE of a pipe did not fail with ENOTSOCK");
	if (fcntl(p[0], F_GETFD) < 0)
		fail("a refused CLOSE closed the pipe");
	close(p[0]);
	close(p[1]);
	c.fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (!ioctl(g_dev, FSOCK_IOC_CLOSE, &c) || errno != EOPNOTSUPP || fcntl(c.fd, F_GETFD) < 0)
		fail("CLOSE of a unix socket did not fail with EOPNOTSUPP, fd kept");
	close(c.fd);
	c.fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (!ioctl(g_dev, FSOCK_IOC_CLOSE, &c) || errno != EOPNOTSUPP || fcntl(c.fd, F_GETFD) < 0)
		fail("CLOSE of a UDP socket did not fail with EOPNOTSUPP, fd kept");
	close(c.fd);
	shutdown_kinds();
}

struct race {
	int lfd;
	volatile int stop;
};

static void *race_spawner(void *arg)
{
	struct race *r = arg;

	while (!r->stop) {
		int lo;

		if (spawn(r->lfd, 1, &lo) == 1)
			close(lo);
	}
	return NULL;
}

static void spawnrace(int ncpu)
{
	struct race r = { .lfd = fs_listener(0, NULL, NULL) };
	pthread_t t;
	int i, lo;

	if (pthread_create(&t, NULL, race_spawner, &r))
		fail("pthread_create");
	for (i = 0; i < 2000; i++)
		if (spawn(r.lfd, 1, &lo) == 1)
			close(lo);
	r.stop = 1;
	pthread_join(t, NULL);
	fs_close(r.lfd);
	unpin(ncpu);
}

/* ---- re-pinned workers (issue 10 item 8 on the reuseport backend) ---------------- */

#define REPIN_CONNS 3

static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void ep_add(int ep, int fd)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = fd };

	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
		fail("epoll_ctl add %d", fd);
}

/* A process on `cpu` making `n` connections to `port`, each sending "x"; it keeps them
 * open until killed. */
static pid_t clients_on(int cpu, int port, int n)
{
	pid_t pid = fork();

	if (pid == 0) {
		for (int i = 0; i < n; i++) {
			int c = connect_from(cpu, port);

			if (write(c, "x", 1) != 1)
				fail("client write");
		}
		for (;;)
			pause();
	}
	if (pid < 0)
		fail("fork");
	return pid;
}

static void reap(pid_t pid)
{
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

static int g_plain;	/* epoll_drain accepts with accept4(2), not ACCEPT */

static int accept_next(int lfd)
{
	struct fsock_accept_args ac = { .fd = lfd, .flags = SOCK_CLOEXEC };

	if (g_plain)
		return accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	return ioctl(g_dev, FSOCK_IOC_ACCEPT, &ac) ? -1 : ac.new_fd;
}

/*
 * The worker's event loop for up to `ms`: on every event ACCEPT until EAGAIN (what
 * libsocket's accept does); an event that accepts nothing is a spurious wakeup. Stops
 * once `want` connections were accepted, each with its byte.
 */
static int epoll_drain(int ep, int lfd, int want, int ms, int *spurious)
{
	struct epoll_event evs[4];
	double end = now_ms() + ms;
	int accepts = 0;

	*spurious = 0;
	while (accepts < want && now_ms() < end) {
		int n = epoll_wait(ep, evs, 4, 50);

		for (int i = 0; i < n; i++) {
			int got = 0;

			for (;;) {
				int a = accept_next(lfd);
				char ch;

				if (a < 0) {
					if (errno != EAGAIN)
						fail("accept");
					break;
				}
				if (read(a, &ch, 1) != 1)
					fail("accepted connection %d was reset", accepts);
				close(a);
				got++;
			}
			accepts += got;
			*spurious += !got;
		}
	}
	return accepts;
}

/* A worker pinned to `cpu` (epoll on the global and its local): writes how many times
 * it was woken in `ms` to `out`. */
static pid_t idle_worker(int lfd, int cpu, int ms, int ready, int out)
{
	pid_t pid = fork();

	if (pid == 0) {
		struct epoll_event ev;
		int ep = epoll_create1(EPOLL_CLOEXEC), lo, wakes = 0;
		double end;

		pin_to(cpu);
		ep_add(ep, lfd);
		if (spawn(lfd, -1, &lo) != cpu)
			fail("idle worker SPAWN cpu %d", cpu);
		ep_add(ep, lo);
		(void)!write(ready, "r", 1);
		for (end = now_ms() + ms; now_ms() < end;)
			wakes += epoll_wait(ep, &ev, 1, 50) > 0;
		(void)!write(out, &wakes, sizeof(wakes));
		_exit(0);
	}
	if (pid < 0)
		fail("fork");
	return pid;
}

/* A worker on cpu 1 as libsocket.so sets it up: the global in epoll, SPAWN, then the local. */
static int worker_on_cpu1(int lfd, int *lo)
{
	int ep;

	pin_to(1);
	ep = epoll_create1(EPOLL_CLOEXEC);
	ep_add(ep, lfd);
	if (spawn(lfd, -1, lo) != 1)
		fail("SPAWN on cpu 1");
	ep_add(ep, *lo);
	return ep;
}

static void repin(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), lo, ep, accepts, spurious, wakes = -1;
	int ready[2], out[2];
	pid_t cl, other;
	char ch;

	if (ncpu < 4) {
		printf("repin: %d cpus, the herd check needs 4: skipped\n", ncpu);
		fs_close(lfd);
		return;
	}
	if (pipe(ready) || pipe(out))
		fail("pipe");
	other = idle_worker(lfd, 3, 2500, ready[1], out[1]);
	if (read(ready[0], &ch, 1) != 1)
		fail("cpu 3 worker did not spawn");
	ep = worker_on_cpu1(lfd, &lo);
	pin_to(2);		/* re-pinned, as a master's sched_setaffinity() does it */
	cl = clients_on(1, port, REPIN_CONNS);
	accepts = epoll_drain(ep, lfd, REPIN_CONNS, 2000, &spurious);
	reap(cl);
	if (read(out[0], &wakes, sizeof(wakes)) != sizeof(wakes))
		fail("cpu 3 worker report");
	waitpid(other, NULL, 0);
	if (accepts != REPIN_CONNS)
		fail("worker moved from cpu 1 to 2 accepted %d of %d cpu 1 connections (%d spurious wakeups)",
		     accepts, REPIN_CONNS, spurious);
	if (spurious > 1)
		fail("%d spurious wakeups of the moved worker", spurious);
	if (wakes)
		fail("thundering herd: the cpu 3 worker was woken %d times", wakes);
	printf("repin: accepted=%d spurious=%d cpu3_wakeups=%d\n", accepts, spurious, wakes);
	close(ep);
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

static void repin_spawn(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), lo1, lo2, ep, accepts, spurious;
	pid_t cl;

	pin_to(1);
	if (spawn(lfd, -1, &lo1) != 1)
		fail("SPAWN on cpu 1");
	ep = epoll_create1(EPOLL_CLOEXEC);
	ep_add(ep, lfd);	/* the ABI's order: SPAWN, then the global in epoll */
	pin_to(2);
	if (spawn(lfd, -1, &lo2) != 2)
		fail("SPAWN again on cpu 2");
	cl = clients_on(1, port, REPIN_CONNS);
	accepts = epoll_drain(ep, lfd, REPIN_CONNS, 2000, &spurious);
	reap(cl);
	if (accepts != REPIN_CONNS)
		fail("worker moved from cpu 1 to 2 accepted %d of %d cpu 1 connections (%d spurious wakeups)",
		     accepts, REPIN_CONNS, spurious);
	close(ep);
	close(lo1);
	close(lo2);
	fs_close(lfd);
	unpin(ncpu);
}

static void repin_queued(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), lo, ep, accepts, spurious, early;
	struct epoll_event ev;
	pid_t cl;

	ep = worker_on_cpu1(lfd, &lo);
	cl = clients_on(1, port, REPIN_CONNS);
	early = epoll_wait(ep, &ev, 1, 2000);	/* reported on cpu 1, not accepted */
	usleep(200000);				/* all of them queued */
	pin_to(2);
	accepts = epoll_drain(ep, lfd, REPIN_CONNS, 2000, &spurious);
	reap(cl);
	if (early != 1 || accepts != REPIN_CONNS)
		fail("reported on cpu 1: %d; accepted on cpu 2: %d of %d (%d spurious wakeups)",
		     early, accepts, REPIN_CONNS, spurious);
	close(ep);
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

static void plainaccept(int ncpu)
{
	int port, lfd = fs_listener(0, NULL, &port), lo, ep, accepts, spurious, moved;
	pid_t cl;

	g_plain = 1;
	fcntl(lfd, F_SETFL, O_NONBLOCK);
	ep = worker_on_cpu1(lfd, &lo);
	cl = clients_on(1, port, REPIN_CONNS);
	accepts = epoll_drain(ep, lfd, REPIN_CONNS, 2000, &spurious);
	reap(cl);
	pin_to(2);
	cl = clients_on(1, port, REPIN_CONNS);
	moved = epoll_drain(ep, lfd, REPIN_CONNS, 2000, &spurious);
	reap(cl);
	if (accepts != REPIN_CONNS || moved != REPIN_CONNS)
		fail("accept4 on the global took %d of %d of its cpu's connections, %d of %d after a re-pin",
		     accepts, REPIN_CONNS, moved, REPIN_CONNS);
	close(ep);
	close(lo);
	fs_close(lfd);
	unpin(ncpu);
}

static void reuseaddr_setup(int fd)
{
	int one = 1;

	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)))
		fail("SO_REUSEADDR");
}

static void reuseaddr(int ncpu)
{
	int port, lfd = fs_listener(0, reuseaddr_setup, &port), lo, c, a, s2;
	struct sockaddr_in sa;
	unsigned long before;
	char ch;

	if (spawn(lfd, 1, &lo) != 1)
		fail("SPAWN cpu 1");
	before = stat_of(1, LOCAL_ACCEPTS);
	c = connect_from(1, port);
	a = fs_accept(lfd);
	if (stat_of(1, LOCAL_ACCEPTS) != before + 1)
		fail("not accepted from the cpu 1 local");
	close(a);		/* the server closes first: its side goes to TIME_WAIT */
	if (read(c, &ch, 1) != 0)
		fail("no FIN from the server");
	close(c);
	close(lo);
	fs_close(lfd);
	usleep(100000);
	sa = lo_addr(port);
	s2 = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	reuseaddr_setup(s2);
	if (bind(s2, (struct sockaddr *)&sa, sizeof(sa)))
		fail("restarted SO_REUSEADDR server cannot bind port %d", port);
	close(s2);
	unpin(ncpu);
}

static void check_dmesg(void)
{
	static char buf[1 << 17];
	int n = klogctl(3, buf, sizeof(buf) - 1);
	char *line;

	if (n < 0)
		fail("klogctl");
	buf[n] = 0;
	for (line = strtok(buf, "\n"); line; line = strtok(NULL, "\n"))
		if (strstr(line, "WARNING") || strstr(line, "BUG") || strstr(line, "Oops") ||
		    strstr(line, "refcount_t") || strstr(line, "suspicious RCU"))
			fail("kernel log: %s", line);
}

static const struct {
	const char *name;
	void (*run)(int ncpu);
} scenarios[] = {
	{ "pin_own", pin_own }, { "pin_narrow", pin_narrow }, { "one_cpu", one_cpu },
	{ "addrinuse", addrinuse }, { "unpriv", unpriv }, { "param", param },
	{ "churn", churn }, { "steer", steer }, { "inherit", inherit },
	{ "md5filter", md5filter }, { "efault", efault }, { "spawnrace", spawnrace },
	{ "closedev", closedev }, { "repin", repin }, { "repin_spawn", repin_spawn },
	{ "repin_queued", repin_queued }, { "plainaccept", plainaccept },
	{ "reuseaddr", reuseaddr },
};

int main(int argc, char **argv)
{
	int ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	unsigned int i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc != 2)
		return 2;
	g_name = argv[1];
	if (ncpu < 3)
		fail("needs 3 CPUs, %d online", ncpu);
	g_dev = open(FASTSOCKET_DEVICE, O_RDWR | O_CLOEXEC);
	if (g_dev < 0)
		fail("open " FASTSOCKET_DEVICE);
	for (i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
		if (strcmp(scenarios[i].name, argv[1]))
			continue;
		unpin(ncpu);
		scenarios[i].run(ncpu);
		check_dmesg();
		printf("FSOCK_REGRESS PASS %s\n", g_name);
		return 0;
	}
	fail("unknown scenario");
	return 2;
}
