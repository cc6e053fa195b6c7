// SPDX-License-Identifier: GPL-2.0
/*
 * fsock_test: end-to-end check of fastsocket.ko inside a test guest, and a worked example
 * of the /dev/fastsocket ABI (fastsocket_abi.h). Build: musl-gcc -static -O2 -I.. -o
 * fsock_test fsock_test.c. Run as root in the guest:
 *
 *   fsock_test [-m fastsocket.ko] [-w workers] [-n connections] [-r]
 *
 * -m loads the module (finit_module) with enable_listen_spawn=2 enable_fast_epoll=1
 * enable_receive_flow_deliver=1 and checks the parameters in sysfs; -r removes it at the
 * end and checks that unload is refused while /dev/fastsocket is open. Steps: VERSION,
 * SOCKET, bind 127.0.0.1, LISTEN, fork one worker per CPU (SPAWN pins it, epoll on the
 * global fd, ACCEPT), a client connecting from every CPU in turn, /proc/net/fastsocket
 * must show local accepts on several CPUs, then dmesg must have no WARNING/BUG.
 * Prints "FSOCK_TEST PASS" or "FSOCK_TEST FAIL: <why>" and exits 0/1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#include "../fastsocket_abi.h"

#define MAX_CPUS 64
#define PARAMS "enable_listen_spawn=2 enable_fast_epoll=1 enable_receive_flow_deliver=1"

static int g_family = AF_INET;	/* -6: IPv6 */
static int g_churn;		/* -c: workers close and re-spawn their local sockets */

static void fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	printf("FSOCK_TEST FAIL: ");
	vprintf(fmt, ap);
	printf(" (errno %d %s)\n", errno, strerror(errno));
	va_end(ap);
	fflush(stdout);
	exit(1);
}

/* 127.0.0.1 or ::1 */
static socklen_t loopback(struct sockaddr_storage *ss, int port)
{
	memset(ss, 0, sizeof(*ss));
	if (g_family == AF_INET6) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;

		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		s6->sin6_addr = in6addr_loopback;
		return sizeof(*s6);
	}
	struct sockaddr_in *s4 = (struct sockaddr_in *)ss;

	s4->sin_family = AF_INET;
	s4->sin_port = htons(port);
	s4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sizeof(*s4);
}

static int is_loopback(const struct sockaddr_storage *ss, socklen_t len)
{
	if (g_family == AF_INET6)
		return len == sizeof(struct sockaddr_in6) && ss->ss_family == AF_INET6 &&
		       !memcmp(&((struct sockaddr_in6 *)ss)->sin6_addr, &in6addr_loopback, 16);
	return len == sizeof(struct sockaddr_in) && ss->ss_family == AF_INET &&
	       ((struct sockaddr_in *)ss)->sin_addr.s_addr == htonl(INADDR_LOOPBACK);
}

static int port_of(const struct sockaddr_storage *ss)
{
	return ntohs(ss->ss_family == AF_INET6 ? ((struct sockaddr_in6 *)ss)->sin6_port
					       : ((struct sockaddr_in *)ss)->sin_port);
}

static void load_module(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || syscall(SYS_finit_module, fd, PARAMS, 0))
		fail("loading %s", path);
	close(fd);
	printf("loaded %s %s\n", path, PARAMS);
}

static int write_sysctl(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY), ok;

	if (fd < 0)
		return -1;
	ok = write(fd, val, strlen(val)) == (ssize_t)strlen(val);
	close(fd);
	return ok ? 0 : -1;
}

static int read_param(const char *name)
{
	char path[128], buf[16] = "";
	FILE *f;

	snprintf(path, sizeof(path), "/sys/module/fastsocket/parameters/%s", name);
	f = fopen(path, "r");
	if (!f || !fgets(buf, sizeof(buf), f))
		fail("reading %s", path);
	fclose(f);
	return atoi(buf);
}

static int write_param(const char *name, const char *val)
{
	char path[128];
	int fd, ok;

	snprintf(path, sizeof(path), "/sys/module/fastsocket/parameters/%s", name);
	fd = open(path, O_WRONLY);
	if (fd < 0)
		fail("opening %s", path);
	ok = write(fd, val, strlen(val)) == (ssize_t)strlen(val);
	close(fd);
	return ok;
}

static void check_params(void)
{
	if (read_param("enable_listen_spawn") != 2 || read_param("enable_fast_epoll") != 1 ||
	    read_param("enable_receive_flow_deliver") != 1 || read_param("debug") != 0)
		fail("parameters in sysfs differ from the load values");
	/* Writable at run time, range-checked. */
	if (!write_param("enable_listen_spawn", "1") || read_param("enable_listen_spawn") != 1)
		fail("run-time write of enable_listen_spawn");
	if (write_param("enable_listen_spawn", "7"))
		fail("enable_listen_spawn=7 accepted");
	if (!write_param("enable_listen_spawn", "2"))
		fail("restoring enable_listen_spawn");
	printf("parameters ok: listen_spawn=2 fast_epoll=1 rfd=1 debug=0, run-time writes ok\n");
}

/*
 * Churn: drop the local socket and spawn a new one while connections arrive (queued ones
 * migrate with tcp_migrate_req=1). epoll registers on the local socket's wait queue when
 * the fd is added, so re-add the global fd after a re-spawn.
 */
static void respawn(int dev, int ep, struct fsock_spawn_args *sp)
{
	struct fsock_close_args cl = { .fd = sp->local_fd };
	struct epoll_event ev = { .events = EPOLLIN, .data.fd = sp->fd };

	if (ioctl(dev, FSOCK_IOC_CLOSE, &cl) || ioctl(dev, FSOCK_IOC_SPAWN, sp))
		fail("re-spawn on cpu %d", sp->cpu);
	if (epoll_ctl(ep, EPOLL_CTL_DEL, sp->fd, NULL) || epoll_ctl(ep, EPOLL_CTL_ADD, sp->fd, &ev))
		fail("epoll re-add");
}

/* One worker: pinned to `cpu` by SPAWN (mode 2), accepts until `stop` is readable. */
static int worker(int dev, int lfd, int cpu, int stop)
{
	struct fsock_spawn_args sp = { .fd = lfd, .cpu = cpu };
	struct epoll_event ev = { .events = EPOLLIN }, out[2];
	int ep, accepted = 0;
	cpu_set_t set;

	if (ioctl(dev, FSOCK_IOC_SPAWN, &sp))
		fail("SPAWN cpu %d", cpu);
	if (sched_getaffinity(0, sizeof(set), &set) || CPU_COUNT(&set) != 1 ||
	    !CPU_ISSET(cpu, &set) || sched_getcpu() != cpu)
		fail("worker for cpu %d not pinned by the module", cpu);
	/* Readiness of the global fd covers this CPU's local socket: epoll it after SPAWN. */
	ep = epoll_create1(0);
	ev.data.fd = lfd;
	if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev))
		fail("epoll on the listen fd");
	ev.data.fd = stop;
	epoll_ctl(ep, EPOLL_CTL_ADD, stop, &ev);
	for (;;) {
		struct fsock_accept_args ac = { .fd = lfd, .flags = SOCK_CLOEXEC };
		struct sockaddr_storage peer;
		socklen_t plen = sizeof(peer);
		char c;
		int n = epoll_wait(ep, out, 2, 5000), i, stopping = 0;

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			fail("worker %d: no event for 5 s", cpu);
		for (i = 0; i < n; i++)
			stopping |= out[i].data.fd == stop;
		ac.addr = (uintptr_t)&peer;
		ac.addrlen = (uintptr_t)&plen;
		while (!ioctl(dev, FSOCK_IOC_ACCEPT, &ac)) {
			if (!is_loopback(&peer, plen))
				fail("ACCEPT peer address");
			if (read(ac.new_fd, &c, 1) == 1)
				(void)!write(ac.new_fd, "y", 1);
			close(ac.new_fd);
			accepted++;
			plen = sizeof(peer);
			if (g_churn && accepted % 3 == 0)
				respawn(dev, ep, &sp);
		}
		if (errno != EAGAIN)
			fail("ACCEPT on cpu %d", cpu);
		if (stopping)
			break;
	}
	close(sp.local_fd);
	return accepted;
}

static void client(int port, int conns, int ncpu)
{
	struct sockaddr_storage sa;
	socklen_t salen = loopback(&sa, port);
	cpu_set_t set;
	int i;

	for (i = 0; i < conns; i++) {
		int fd = socket(g_family, SOCK_STREAM, 0);
		char c = 'x';

		/* Loopback SYNs are processed on the sending CPU: connect from each in turn. */
		CPU_ZERO(&set);
		CPU_SET(i % ncpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, salen))
			fail("connect %d", i);
		if (write(fd, &c, 1) != 1 || read(fd, &c, 1) != 1 || c != 'y')
			fail("request %d", i);
		close(fd);
	}
	CPU_ZERO(&set);
	for (i = 0; i < ncpu; i++)
		CPU_SET(i, &set);
	sched_setaffinity(0, sizeof(set), &set);
}

struct stats {
	unsigned long v[MAX_CPUS][5];
	int lines;
};

static void read_stats(struct stats *st, int print)
{
	char line[256];
	int cpu;
	FILE *f = fopen("/proc/net/fastsocket", "r");

	memset(st, 0, sizeof(*st));
	if (!f || !fgets(line, sizeof(line), f))
		fail("reading /proc/net/fastsocket");
	if (strcmp(line, "cpu local_lookups global_lookups local_accepts global_accepts steered\n"))
		fail("/proc/net/fastsocket header: %s", line);
	if (print)
		printf("%s", line);
	while (fgets(line, sizeof(line), f) && st->lines < MAX_CPUS) {
		unsigned long *v = st->v[st->lines];

		if (print)
			printf("%s", line);
		if (sscanf(line, "cpu%d %lu %lu %lu %lu %lu", &cpu, &v[0], &v[1], &v[2], &v[3],
			   &v[4]) != 6 || cpu != st->lines)
			fail("bad stats line: %s", line);
		st->lines++;
	}
	fclose(f);
}

/*
 * Connections come from every CPU in turn. A CPU with a worker has a local socket and the
 * steering program must deliver its connections there; the others go to the global socket.
 * Returns the number of CPUs with local accepts.
 */
static int check_stats(const struct stats *a, const struct stats *b, int ncpu, int workers,
		       int conns)
{
	unsigned long local = 0, global = 0, want_local = 0;
	int cpu, busy = 0;

	if (b->lines < ncpu)
		fail("stats have %d CPU lines, %d online", b->lines, ncpu);
	for (cpu = 0; cpu < b->lines; cpu++) {
		unsigned long l = b->v[cpu][2] - a->v[cpu][2];

		busy += l > 0;
		local += l;
		global += b->v[cpu][3] - a->v[cpu][3];
	}
	for (cpu = 0; cpu < ncpu; cpu++)
		if (cpu < workers)
			want_local += conns / ncpu + (cpu < conns % ncpu);
	printf("accepted %lu local (expected %lu from CPUs with a worker), %lu global\n",
	       local, want_local, global);
	if (local + global != (unsigned long)conns)
		fail("stats count %lu accepts, expected %d", local + global, conns);
	/* Churn: connections queued on a closing local socket migrate elsewhere. */
	if (local != want_local && !g_churn)
		fail("steering: %lu local accepts, expected %lu", local, want_local);
	return busy;
}

static void check_dmesg(void)
{
	static char buf[1 << 17];
	int n = klogctl(3, buf, sizeof(buf) - 1);
	char *line;

	if (n < 0)
		fail("klogctl");
	buf[n] = 0;
	for (line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
		if (strstr(line, "fastsocket"))
			printf("dmesg: %s\n", line);
		if (strstr(line, "WARNING") || strstr(line, "BUG") || strstr(line, "Oops"))
			fail("kernel log: %s", line);
	}
}

static int connect_to(int port)
{
	struct sockaddr_storage sa;
	socklen_t salen = loopback(&sa, port);
	int fd = socket(g_family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		fail("socket");
	if (connect(fd, (struct sockaddr *)&sa, salen)) {
		close(fd);
		return -1;
	}
	return fd;
}

/*
 * After fork a process re-spawns its listeners with SPAWN_ALL (the module picks and pins
 * the CPU); a connection from that CPU lands on the new local socket. SHUTDOWN of the
 * global stops its local sockets too; CLOSE then also closes the unreported local fd
 * (the final rmmod proves it: an open local socket holds the module).
 */
static void check_spawn_all_and_shutdown(int dev, int lfd, int port)
{
	struct fsock_accept_args ac = { .fd = lfd };
	struct fsock_shutdown_args sh = { .fd = lfd, .how = SHUT_RDWR };
	struct stats a, b;
	cpu_set_t set;
	int n, cpu, c;

	n = ioctl(dev, FSOCK_IOC_SPAWN_ALL);
	cpu = sched_getcpu();
	if (n != 1 || sched_getaffinity(0, sizeof(set), &set) || CPU_COUNT(&set) != 1 ||
	    !CPU_ISSET(cpu, &set))
		fail("SPAWN_ALL returned %d, not pinned", n);
	read_stats(&a, 0);
	c = connect_to(port);
	if (c < 0 || ioctl(dev, FSOCK_IOC_ACCEPT, &ac))
		fail("accept after SPAWN_ALL");
	read_stats(&b, 0);
	if (b.v[cpu][2] != a.v[cpu][2] + 1)
		fail("connection from cpu%d not on its SPAWN_ALL local socket", cpu);
	close(ac.new_fd);
	close(c);
	if (ioctl(dev, FSOCK_IOC_SHUTDOWN, &sh))
		fail("SHUTDOWN");
	c = connect_to(port);
	if (c >= 0 || errno != ECONNREFUSED)
		fail("connect after SHUTDOWN of the global socket");
	printf("SPAWN_ALL on cpu%d, SHUTDOWN ok\n", cpu);
}

/* Bad arguments get clean errors. */
static void check_errors(int dev, int lfd, int ncpu)
{
	struct fsock_spawn_args sp = { .fd = lfd, .cpu = ncpu + 100 };
	struct fsock_accept_args ac = { .fd = lfd, .flags = 0x4000000 };
	struct fsock_listen_args li = { .fd = 9999, .backlog = 1 };
	int plain = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (!ioctl(dev, FSOCK_IOC_SPAWN, &sp) || errno != EINVAL)
		fail("SPAWN for an absent CPU");
	if (!ioctl(dev, FSOCK_IOC_ACCEPT, &ac) || errno != EINVAL)
		fail("ACCEPT with bad flags");
	if (!ioctl(dev, FSOCK_IOC_LISTEN, &li) || errno != EBADF)
		fail("LISTEN on a closed fd");
	sp.fd = plain;
	sp.cpu = 0;
	if (!ioctl(dev, FSOCK_IOC_SPAWN, &sp) || errno != EINVAL)
		fail("SPAWN on a socket that is not listening");
	if (!ioctl(dev, _IO(FASTSOCKET_IOC_MAGIC, 0x7f)) || errno != ENOTTY)
		fail("unknown ioctl");
	/* A socket made with plain socket(2) and bound before LISTEN still gets spawned. */
	struct sockaddr_in sa = { .sin_family = AF_INET };
	struct fsock_listen_args pl = { .fd = plain, .backlog = 8 };
	struct fsock_close_args cl = { .fd = plain };
	cpu_set_t all;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sched_getaffinity(0, sizeof(all), &all);
	if (bind(plain, (struct sockaddr *)&sa, sizeof(sa)) || ioctl(dev, FSOCK_IOC_LISTEN, &pl))
		fail("LISTEN on a plain socket");
	sp.cpu = ncpu - 1;
	if (ioctl(dev, FSOCK_IOC_SPAWN, &sp) || sp.local_fd < 0 || sched_getcpu() != ncpu - 1)
		fail("SPAWN on a plain socket");
	close(sp.local_fd);
	if (ioctl(dev, FSOCK_IOC_CLOSE, &cl))
		fail("CLOSE of a plain listener");
	sched_setaffinity(0, sizeof(all), &all);
	printf("error paths ok\n");
}

int main(int argc, char **argv)
{
	const char *module = NULL;
	int workers = 0, conns = 64, unload = 0, opt, ncpu, dev, lfd, i, busy, stop[2];
	int accepted = 0, status;
	static struct stats before, after;
	struct fsock_version ver;
	struct fsock_socket_args so = { .type = SOCK_STREAM | SOCK_CLOEXEC };
	struct sockaddr_storage sa;
	socklen_t slen;
	int port;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "m:w:n:r6c")) != -1) {
		if (opt == '6')
			g_family = AF_INET6;
		else if (opt == 'c')
			g_churn = 1;
		else if (opt == 'm')
			module = optarg;
		else if (opt == 'w')
			workers = atoi(optarg);
		else if (opt == 'n')
			conns = atoi(optarg);
		else if (opt == 'r')
			unload = 1;
		else
			return 2;
	}
	ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	if (ncpu > MAX_CPUS)
		ncpu = MAX_CPUS;
	if (workers <= 0 || workers > ncpu)
		workers = ncpu;
	if (module) {
		load_module(module);
		check_params();
	}

	dev = open(FASTSOCKET_DEVICE, O_RDWR | O_CLOEXEC);
	if (dev < 0)
		fail("open " FASTSOCKET_DEVICE);
	if (ioctl(dev, FSOCK_IOC_VERSION, &ver) || ver.abi != FASTSOCKET_ABI_VERSION)
		fail("VERSION (abi %u)", ver.abi);
	printf("VERSION abi %u features %#x listen_spawn %u\n", ver.abi, ver.features,
	       ver.listen_spawn);
	if (!(ver.features & FSOCK_FEAT_LISTEN_SPAWN) || ver.listen_spawn != 2)
		fail("listen spawn not reported");

	so.family = g_family;
	if (g_churn && write_sysctl("/proc/sys/net/ipv4/tcp_migrate_req", "1"))
		fail("tcp_migrate_req");
	if (ioctl(dev, FSOCK_IOC_SOCKET, &so) || so.fd < 0)
		fail("SOCKET");
	lfd = so.fd;
	slen = loopback(&sa, 0);
	if (bind(lfd, (struct sockaddr *)&sa, slen) ||
	    getsockname(lfd, (struct sockaddr *)&sa, &slen))
		fail("bind loopback");
	port = port_of(&sa);
	struct fsock_listen_args li = { .fd = lfd, .backlog = 128 };
	if (ioctl(dev, FSOCK_IOC_LISTEN, &li))
		fail("LISTEN");
	check_errors(dev, lfd, ncpu);
	printf("listening on %s port %d, %d workers, %d CPUs%s\n",
	       g_family == AF_INET6 ? "::1" : "127.0.0.1", port, workers, ncpu,
	       g_churn ? ", workers re-spawn every 3 accepts" : "");

	if (pipe(stop))
		fail("pipe");
	for (i = 0; i < workers; i++) {
		pid_t pid = fork();

		if (pid < 0)
			fail("fork");
		if (pid == 0) {
			close(stop[1]);
			int n = worker(dev, lfd, i, stop[0]);

			printf("worker cpu%d accepted %d\n", i, n);
			_exit(n > 250 ? 250 : n);
		}
	}
	close(stop[0]);
	usleep(300000);	/* let the workers spawn before the client starts */
	read_stats(&before, 0);
	client(port, conns, ncpu);
	close(stop[1]);
	for (i = 0; i < workers; i++) {
		if (wait(&status) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) > 250)
			fail("worker failed");
		accepted += WEXITSTATUS(status);
	}
	if (accepted != conns)
		fail("workers accepted %d of %d", accepted, conns);
	read_stats(&after, 1);
	busy = check_stats(&before, &after, ncpu, workers, conns);
	printf("accepts from local sockets on %d CPUs\n", busy);
	if (busy < (workers < 2 ? workers : 2))
		fail("local accepts on only %d CPUs", busy);

	check_spawn_all_and_shutdown(dev, lfd, port);

	struct fsock_close_args cl = { .fd = lfd };
	if (ioctl(dev, FSOCK_IOC_CLOSE, &cl))
		fail("CLOSE");
	if (unload) {
		if (!syscall(SYS_delete_module, "fastsocket", O_NONBLOCK))
			fail("module unloaded while /dev/fastsocket is open");
		close(dev);
		for (i = 0; syscall(SYS_delete_module, "fastsocket", O_NONBLOCK); i++) {
			if (i == 50)
				fail("rmmod fastsocket");
			usleep(100000);
		}
		printf("rmmod fastsocket ok\n");
	}
	check_dmesg();
	printf("FSOCK_TEST PASS\n");
	return 0;
}
