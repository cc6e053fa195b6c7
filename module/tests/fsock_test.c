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

static void load_module(const char *path)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0 || syscall(SYS_finit_module, fd, PARAMS, 0))
		fail("loading %s", path);
	close(fd);
	printf("loaded %s %s\n", path, PARAMS);
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
		struct sockaddr_in peer;
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
			if (plen != sizeof(peer) || peer.sin_addr.s_addr != htonl(INADDR_LOOPBACK))
				fail("ACCEPT peer address");
			if (read(ac.new_fd, &c, 1) == 1)
				(void)!write(ac.new_fd, "y", 1);
			close(ac.new_fd);
			accepted++;
			plen = sizeof(peer);
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
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	cpu_set_t set;
	int i;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	for (i = 0; i < conns; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		char c = 'x';

		/* Loopback SYNs are processed on the sending CPU: connect from each in turn. */
		CPU_ZERO(&set);
		CPU_SET(i % ncpu, &set);
		sched_setaffinity(0, sizeof(set), &set);
		if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)))
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
	if (local != want_local)
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
	close(plain);
	printf("error paths ok\n");
}

int main(int argc, char **argv)
{
	const char *module = NULL;
	int workers = 0, conns = 64, unload = 0, opt, ncpu, dev, lfd, i, busy, stop[2];
	int accepted = 0, status;
	static struct stats before, after;
	struct fsock_version ver;
	struct fsock_socket_args so = { .family = AF_INET, .type = SOCK_STREAM | SOCK_CLOEXEC };
	struct sockaddr_in sa = { .sin_family = AF_INET };
	socklen_t slen = sizeof(sa);

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "m:w:n:r")) != -1) {
		if (opt == 'm')
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

	if (ioctl(dev, FSOCK_IOC_SOCKET, &so) || so.fd < 0)
		fail("SOCKET");
	lfd = so.fd;
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) ||
	    getsockname(lfd, (struct sockaddr *)&sa, &slen))
		fail("bind 127.0.0.1");
	struct fsock_listen_args li = { .fd = lfd, .backlog = 128 };
	if (ioctl(dev, FSOCK_IOC_LISTEN, &li))
		fail("LISTEN");
	check_errors(dev, lfd, ncpu);
	printf("listening on 127.0.0.1:%d, %d workers, %d CPUs\n", ntohs(sa.sin_port), workers,
	       ncpu);

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
	client(ntohs(sa.sin_port), conns, ncpu);
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
