/* fsstress: the programs of the guest stress suite (ci/guest/stress.sh).
 * Built dynamically with musl-gcc so that LD_PRELOAD=libsocket.so applies to `serve`
 * (the guest ships the musl loader); builds with the host gcc too (tests/test_stress.py).
 *
 *   fsstress serve -p PORT[,PORT] [-w N] [-c CPU0] [-m] [-e] [-s STATS]
 *       master + N workers pinned to CPU0+i, epoll over every listener, one request per
 *       connection. -m: odd workers accept with the raw accept4 syscall (bypassing the
 *       library); -e: worker 0 execs `fsstress child` on the inherited listen fds.
 *       Signals to the master: SIGUSR2 SIGKILLs the next worker between two connections
 *       (restarted at once),
 *       SIGHUP replaces every worker (graceful reload), SIGUSR1 re-pins live worker 0 to
 *       the next CPU, SIGTERM stops and prints one `serve:` line of counters (also to STATS).
 *   fsstress load -a IP:PORT[,IP:PORT] [-c CONNS] [-n N | -d SECS] [-t TIMEOUT_MS]
 *       CONNS threads (thread i pinned to CPU i), each: connect, request, check the whole
 *       response. Prints `load: requests=.. ok=.. errors=.. resets=.. ...`; exit 1 on error.
 *   fsstress storm [-t THREADS] [-n ITER]     SOCKET/LISTEN/SPAWN/CLOSE from many threads
 *   fsstress hostile [-u UID]                 bad ioctl input as an unprivileged user
 *   fsstress netns CMD [ARG...]               CMD in a new network namespace, lo up
 *   fsstress child FD[,FD]                    (exec'd by serve -e) plain accept loop
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../module/fastsocket_abi.h"

#ifndef SO_INCOMING_CPU
#define SO_INCOMING_CPU 49
#endif
#define MAXW 64
#define MAXL 4
#define REPLY "HTTP/1.0 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nfsstress-ok\n"
#define REQUEST "GET / HTTP/1.0\r\nHost: fsstress\r\n\r\n"

static int ncpu(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);
	return n > 0 ? (int)n : 1;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int pin(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu % ncpu(), &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

static int parse_addr(const char *s, struct sockaddr_in *sa)
{
	char host[64];
	const char *colon = strrchr(s, ':');

	if (!colon || colon - s >= (long)sizeof(host))
		return -1;
	memcpy(host, s, colon - s);
	host[colon - s] = 0;
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons(atoi(colon + 1));
	return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

/* ------------------------------------------------------------------ serve */

struct wstats {		/* one per worker slot, in shared memory */
	unsigned long accepted, spurious, wakeups, on_syn_cpu, syn_known, plain, errors;
};

static struct wstats *g_st;
static int g_nlis, g_lis[MAXL], g_workers = 4, g_cpu0, g_mixed, g_exec;
static pid_t g_pid[MAXW];
static int g_cpu_of[MAXW];
static volatile sig_atomic_t g_stop, g_hup, g_usr1, g_drain, g_die;
static unsigned long g_restarts, g_reloads, g_repins, g_kills;

static void on_sig(int sig)
{
	if (sig == SIGTERM || sig == SIGINT)
		g_stop = 1;
	else if (sig == SIGHUP)
		g_hup = 1;
	else if (sig == SIGUSR1)
		g_usr1 = g_die = 1;
	else if (sig == SIGUSR2)
		g_drain = 1;
}

static void handle(int c)
{
	char buf[1024];
	size_t got = 0;
	struct pollfd p = { .fd = c, .events = POLLIN };

	while (got < sizeof(buf) - 1 && !memmem(buf, got, "\r\n\r\n", 4)) {
		ssize_t r;
		int pr = poll(&p, 1, 5000);

		if (pr < 0 && errno == EINTR)
			continue;
		if (pr <= 0)
			return;
		r = read(c, buf + got, sizeof(buf) - 1 - got);
		if (r <= 0)
			return;
		got += r;
	}
	if (write(c, REPLY, sizeof(REPLY) - 1) < 0)
		return;
}

/* Accept everything queued on listener l; returns how many were accepted. */
static int drain(int id, int l, int raw)
{
	int n = 0;

	for (;;) {
		int c, cpu = -1, self = sched_getcpu();
		socklen_t len = sizeof(cpu);

		c = raw ? (int)syscall(SYS_accept4, l, NULL, NULL, SOCK_CLOEXEC)
			: accept4(l, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
			    errno != ECONNABORTED)
				__atomic_add_fetch(&g_st[id].errors, 1, __ATOMIC_RELAXED);
			return n;
		}
		n++;
		__atomic_add_fetch(&g_st[id].accepted, 1, __ATOMIC_RELAXED);
		if (raw)
			__atomic_add_fetch(&g_st[id].plain, 1, __ATOMIC_RELAXED);
		/* syn_known: the kernel tells the SYN's CPU (SO_INCOMING_CPU: Linux >= 3.19) */
		if (getsockopt(c, SOL_SOCKET, SO_INCOMING_CPU, &cpu, &len) == 0) {
			__atomic_add_fetch(&g_st[id].syn_known, 1, __ATOMIC_RELAXED);
			if (cpu == self)
				__atomic_add_fetch(&g_st[id].on_syn_cpu, 1, __ATOMIC_RELAXED);
		}
		handle(c);
		close(c);
		if (g_die)	/* churn: SIGKILL, but between connections (see worker) */
			raise(SIGKILL);
	}
}

static void exec_child(void)
{
	char arg[64] = "", *argv[] = { "fsstress", "child", arg, NULL };
	char self[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	int i;

	for (i = 0; i < g_nlis; i++) {
		fcntl(g_lis[i], F_SETFD, 0);	/* inherited across exec */
		snprintf(arg + strlen(arg), sizeof(arg) - strlen(arg), "%s%d", i ? "," : "", g_lis[i]);
	}
	if (n > 0) {
		self[n] = 0;
		execv(self, argv);
	}
	perror("fsstress: exec child");
	_exit(3);
}

static int worker(int id)
{
	struct epoll_event ev, evs[MAXL];
	int ep, i, raw = g_mixed && (id & 1);
	struct sigaction sa = { .sa_handler = on_sig, .sa_flags = SA_RESTART };

	/* SIGUSR2: drain and exit (reload). SIGUSR1: SIGKILL yourself before the next
	 * connection: an accepted connection dies with its worker on any server; what churn
	 * must never lose are the connections still queued in the kernel. */
	g_die = g_drain = 0;	/* the master's flags, copied by fork */
	sigaction(SIGUSR2, &sa, NULL);
	sigaction(SIGUSR1, &sa, NULL);
	signal(SIGHUP, SIG_IGN);
	pin(g_cpu_of[id]);
	if (g_exec && id == 0)
		exec_child();
	ep = epoll_create1(EPOLL_CLOEXEC);
	for (i = 0; i < g_nlis; i++) {
		ev.events = EPOLLIN;
		ev.data.u32 = i;
		if (epoll_ctl(ep, EPOLL_CTL_ADD, g_lis[i], &ev) != 0) {
			perror("fsstress: epoll_ctl");
			return 1;
		}
	}
	while (!g_stop) {
		int n = g_die ? raise(SIGKILL) : epoll_wait(ep, evs, MAXL, g_drain ? 0 : 200);

		if (n == 0 && g_drain)
			break;	/* reload: queues empty, the new generation takes over */
		for (i = 0; i < n; i++) {
			__atomic_add_fetch(&g_st[id].wakeups, 1, __ATOMIC_RELAXED);
			if (drain(id, g_lis[evs[i].data.u32], raw) == 0)
				__atomic_add_fetch(&g_st[id].spurious, 1, __ATOMIC_RELAXED);
		}
	}
	return 0;
}

static pid_t start_worker(int id)
{
	pid_t p = fork();

	if (p == 0)
		_exit(worker(id));
	return p;
}

static void reap(void)
{
	int st, i;
	pid_t p;

	while ((p = waitpid(-1, &st, WNOHANG)) > 0)
		for (i = 0; i < g_workers; i++)
			if (g_pid[i] == p) {
				g_pid[i] = g_stop ? 0 : start_worker(i);
				g_restarts += !g_stop;
			}
}

/* Graceful reload: a new generation first, then the old one drains its queues and exits. */
static void reload(void)
{
	pid_t old[MAXW];
	int i;

	for (i = 0; i < g_workers; i++) {
		old[i] = g_pid[i];
		g_pid[i] = start_worker(i);
	}
	for (i = 0; i < g_workers; i++)
		if (old[i] > 0) {
			kill(old[i], SIGUSR2);
			waitpid(old[i], NULL, 0);
		}
	g_reloads++;
}

static void print_serve(FILE *f)
{
	struct wstats t = { 0 };
	int i;

	for (i = 0; i < MAXW; i++) {
		t.accepted += g_st[i].accepted;
		t.spurious += g_st[i].spurious;
		t.wakeups += g_st[i].wakeups;
		t.on_syn_cpu += g_st[i].on_syn_cpu;
		t.syn_known += g_st[i].syn_known;
		t.plain += g_st[i].plain;
		t.errors += g_st[i].errors;
	}
	fprintf(f, "serve: accepted=%lu wakeups=%lu spurious=%lu on_syn_cpu=%lu syn_known=%lu "
		"plain=%lu errors=%lu kills=%lu restarts=%lu reloads=%lu repins=%lu\n", t.accepted,
		t.wakeups, t.spurious, t.on_syn_cpu, t.syn_known, t.plain, t.errors, g_kills,
		g_restarts, g_reloads, g_repins);
	fflush(f);
}

static int open_listener(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (s < 0)
		return -1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s, (struct sockaddr *)&sa, sizeof(sa)) || listen(s, 1024)) {
		close(s);
		return -1;
	}
	return s;
}

static int cmd_serve(int argc, char **argv)
{
	const char *ports = "8090", *stats = NULL;
	struct sigaction sa = { .sa_handler = on_sig };
	char *tok, *save, buf[64];
	int o, i;

	while ((o = getopt(argc, argv, "p:w:c:mes:")) != -1) {
		switch (o) {
		case 'p': ports = optarg; break;
		case 'w': g_workers = atoi(optarg); break;
		case 'c': g_cpu0 = atoi(optarg); break;
		case 'm': g_mixed = 1; break;
		case 'e': g_exec = 1; break;
		case 's': stats = optarg; break;
		default: return 2;
		}
	}
	if (g_workers < 1 || g_workers > MAXW)
		return 2;
	snprintf(buf, sizeof(buf), "%s", ports);
	for (tok = strtok_r(buf, ",", &save); tok && g_nlis < MAXL; tok = strtok_r(NULL, ",", &save)) {
		if ((g_lis[g_nlis] = open_listener(atoi(tok))) < 0) {
			fprintf(stderr, "fsstress: listen on %s: %s\n", tok, strerror(errno));
			return 1;
		}
		g_nlis++;
	}
	g_st = mmap(NULL, sizeof(*g_st) * MAXW, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (g_st == MAP_FAILED)
		return 1;
	memset(g_st, 0, sizeof(*g_st) * MAXW);
	for (i = 0; i < 6; i++) {
		static const int sigs[] = { SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGCHLD };
		sigaction(sigs[i], &sa, NULL);
	}
	for (i = 0; i < g_workers; i++) {
		g_cpu_of[i] = (g_cpu0 + i) % ncpu();
		g_pid[i] = start_worker(i);
	}
	printf("serve: ready workers=%d listeners=%d\n", g_workers, g_nlis);
	fflush(stdout);
	while (!g_stop) {
		usleep(50000);
		reap();
		if (g_hup) {
			g_hup = 0;
			reload();
		}
		if (g_drain) {	/* SIGUSR2 to the master: the next worker SIGKILLs itself */
			int k = g_kills++ % g_workers;

			g_drain = 0;
			if (g_pid[k] > 0)
				kill(g_pid[k], SIGUSR1);
		}
		if (g_usr1 && g_pid[0] > 0) {	/* re-pin a live worker: its listeners stay */
			cpu_set_t set;

			g_usr1 = 0;
			g_cpu_of[0] = (g_cpu_of[0] + 1) % ncpu();
			CPU_ZERO(&set);
			CPU_SET(g_cpu_of[0], &set);
			g_repins += sched_setaffinity(g_pid[0], sizeof(set), &set) == 0;
		}
	}
	for (i = 0; i < g_workers; i++)
		if (g_pid[i] > 0)
			kill(g_pid[i], SIGTERM);
	for (i = 0; i < g_workers; i++)
		if (g_pid[i] > 0)
			waitpid(g_pid[i], NULL, 0);
	print_serve(stdout);
	if (stats) {
		FILE *f = fopen(stats, "w");
		if (f) {
			print_serve(f);
			fclose(f);
		}
	}
	return 0;
}

/* exec'd child: blocking plain accept() on inherited listen fds (no library state). */
static int cmd_child(int argc, char **argv)
{
	struct pollfd p[MAXL];
	int n = 0, i;
	char *tok, *save;

	if (argc < 2)
		return 2;
	for (tok = strtok_r(argv[1], ",", &save); tok && n < MAXL; tok = strtok_r(NULL, ",", &save)) {
		p[n].fd = atoi(tok);
		p[n++].events = POLLIN;
	}
	signal(SIGTERM, SIG_DFL);
	for (;;) {
		if (poll(p, n, -1) < 0)
			continue;
		for (i = 0; i < n; i++) {
			int c = (p[i].revents & POLLIN) ? accept4(p[i].fd, NULL, NULL, SOCK_CLOEXEC) : -1;
			if (c >= 0) {
				handle(c);
				close(c);
			}
		}
	}
}

/* ------------------------------------------------------------------ load */

struct lstats {
	unsigned long requests, ok, errors, resets, timeouts, refused, bad, rfd_local, rfd_seen;
};

static struct sockaddr_in g_addr[MAXL];
static int g_naddr, g_timeout_ms = 5000;
static long g_left;		/* requests still to start (-n), or -1 with a deadline */
static double g_deadline;
static struct lstats g_ls;
static pthread_mutex_t g_lmu = PTHREAD_MUTEX_INITIALIZER;

static int take(void)
{
	if (g_left < 0)
		return now() < g_deadline;
	return __atomic_sub_fetch(&g_left, 1, __ATOMIC_RELAXED) >= 0;
}

/* Every response is checked whole: a 200 status line, the end of the headers, and a body
 * of exactly Content-Length bytes (any server: ours, the demo, the demo as a proxy). */
static int valid_reply(char *buf, size_t got)
{
	char *end, *cl;
	long want;

	buf[got] = 0;
	if (got < 12 || (strncmp(buf, "HTTP/1.0 200 ", 13) && strncmp(buf, "HTTP/1.1 200 ", 13)))
		return 0;
	end = memmem(buf, got, "\r\n\r\n", 4);
	if (!end)
		return 0;
	*end = 0;
	cl = strcasestr(buf, "\r\nContent-Length:");
	want = cl ? strtol(cl + 17, NULL, 10) : -1;
	*end = '\r';
	return want >= 0 && (size_t)want == got - (size_t)(end + 4 - buf);
}

/* One connection, one request; 0 ok, else the lstats field to count. */
static int one_request(const struct sockaddr_in *sa, struct lstats *s)
{
	char buf[2048];
	size_t got = 0;
	int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), cpu = -1, self = sched_getcpu();
	socklen_t len = sizeof(cpu);
	struct timeval tv = { g_timeout_ms / 1000, (g_timeout_ms % 1000) * 1000 };
	int rc = 0;

	if (c < 0)
		return 'e';
	setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (connect(c, (const struct sockaddr *)sa, sizeof(*sa)) != 0) {
		rc = errno == ECONNREFUSED ? 'f' : errno == ECONNRESET ? 'r' : errno == EINPROGRESS ||
		     errno == ETIMEDOUT || errno == EAGAIN ? 't' : 'e';
		goto out;
	}
	if (write(c, REQUEST, sizeof(REQUEST) - 1) != (ssize_t)(sizeof(REQUEST) - 1)) {
		rc = errno == ECONNRESET || errno == EPIPE ? 'r' : 'e';
		goto out;
	}
	for (;;) {
		ssize_t r = read(c, buf + got, sizeof(buf) - 1 - got);
		if (r == 0)
			break;
		if (r < 0) {
			rc = errno == ECONNRESET ? 'r' : errno == EAGAIN || errno == EWOULDBLOCK ? 't' : 'e';
			goto out;
		}
		got += r;
		if (got == sizeof(buf) - 1)
			break;
	}
	if (!valid_reply(buf, got)) {
		rc = 'b';
		goto out;
	}
	/* rfd_seen: replies whose CPU the kernel tells (no SO_INCOMING_CPU before 3.19) */
	if (getsockopt(c, SOL_SOCKET, SO_INCOMING_CPU, &cpu, &len) == 0) {
		s->rfd_seen++;
		s->rfd_local += cpu == self;
	}
out:
	close(c);
	return rc;
}

static void *load_thread(void *arg)
{
	long id = (long)arg;
	struct lstats s = { 0 };
	unsigned i = 0;

	pin(id);
	while (take()) {
		int rc = one_request(&g_addr[i++ % g_naddr], &s);

		s.requests++;
		switch (rc) {
		case 0: s.ok++; break;
		case 'r': s.resets++; break;
		case 't': s.timeouts++; break;
		case 'f': s.refused++; break;
		case 'b': s.bad++; break;
		default: s.errors++; break;
		}
	}
	pthread_mutex_lock(&g_lmu);
	g_ls.requests += s.requests;
	g_ls.ok += s.ok;
	g_ls.errors += s.errors;
	g_ls.resets += s.resets;
	g_ls.timeouts += s.timeouts;
	g_ls.refused += s.refused;
	g_ls.bad += s.bad;
	g_ls.rfd_local += s.rfd_local;
	g_ls.rfd_seen += s.rfd_seen;
	pthread_mutex_unlock(&g_lmu);
	return NULL;
}

static int cmd_load(int argc, char **argv)
{
	pthread_t th[MAXW];
	int conns = 8, o, i;
	double secs = 0, t0;
	char *tok, *save;
	unsigned long fails;

	g_left = 100;
	while ((o = getopt(argc, argv, "a:c:n:d:t:")) != -1) {
		switch (o) {
		case 'a':
			for (tok = strtok_r(optarg, ",", &save); tok && g_naddr < MAXL;
			     tok = strtok_r(NULL, ",", &save))
				if (parse_addr(tok, &g_addr[g_naddr++]))
					return 2;
			break;
		case 'c': conns = atoi(optarg); break;
		case 'n': g_left = atol(optarg); break;
		case 'd': secs = atof(optarg); break;
		case 't': g_timeout_ms = atoi(optarg); break;
		default: return 2;
		}
	}
	if (!g_naddr || conns < 1 || conns > MAXW)
		return 2;
	if (secs > 0) {
		g_left = -1;
		g_deadline = now() + secs;
	}
	signal(SIGPIPE, SIG_IGN);
	t0 = now();
	for (i = 0; i < conns; i++)
		pthread_create(&th[i], NULL, load_thread, (void *)(long)i);
	for (i = 0; i < conns; i++)
		pthread_join(th[i], NULL);
	t0 = now() - t0;
	fails = g_ls.errors + g_ls.resets + g_ls.timeouts + g_ls.refused + g_ls.bad;
	printf("load: requests=%lu ok=%lu errors=%lu resets=%lu timeouts=%lu refused=%lu bad=%lu "
	       "rfd_local=%lu rfd_seen=%lu rps=%.1f secs=%.2f\n", g_ls.requests, g_ls.ok, g_ls.errors,
	       g_ls.resets, g_ls.timeouts, g_ls.refused, g_ls.bad, g_ls.rfd_local, g_ls.rfd_seen,
	       t0 > 0 ? g_ls.ok / t0 : 0.0, t0);
	return fails || !g_ls.ok ? 1 : 0;
}

/* ------------------------------------------------------------------ storm */

static int g_dev = -1, g_iters = 200;
static unsigned long g_calls, g_okcalls;

static void *storm_thread(void *arg)
{
	unsigned long calls = 0, ok = 0;
	int i;

	pin((int)(long)arg);
	for (i = 0; i < g_iters; i++) {
		struct fsock_socket_args s = { AF_INET, SOCK_STREAM, 0, -1 };
		struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
		struct fsock_listen_args l;
		struct fsock_spawn_args sp;
		struct fsock_close_args c;

		calls++;
		if (ioctl(g_dev, FSOCK_IOC_SOCKET, &s) != 0)
			continue;
		ok++;
		bind(s.fd, (struct sockaddr *)&sa, sizeof(sa));
		l.fd = s.fd;
		l.backlog = 16;
		calls += 3;
		ok += ioctl(g_dev, FSOCK_IOC_LISTEN, &l) == 0;
		sp.fd = s.fd;
		sp.cpu = (i & 1) ? -1 : (int)(i % ncpu());
		sp.local_fd = -1;
		sp.pad = 0;
		ok += ioctl(g_dev, FSOCK_IOC_SPAWN, &sp) == 0;
		if (i % 3 == 0)
			ok += ioctl(g_dev, FSOCK_IOC_SPAWN_ALL) == 0, calls++;
		c.fd = s.fd;
		c.pad = 0;
		ok += ioctl(g_dev, FSOCK_IOC_CLOSE, &c) == 0;
		/* a second CLOSE of the same number must fail or hit a new fd of ours, never crash */
		calls++;
		ok += ioctl(g_dev, FSOCK_IOC_CLOSE, &c) == 0;
	}
	__atomic_add_fetch(&g_calls, calls, __ATOMIC_RELAXED);
	__atomic_add_fetch(&g_okcalls, ok, __ATOMIC_RELAXED);
	return NULL;
}

static int cmd_storm(int argc, char **argv)
{
	pthread_t th[MAXW];
	int threads = 8, o, i;

	while ((o = getopt(argc, argv, "t:n:")) != -1) {
		if (o == 't')
			threads = atoi(optarg);
		else if (o == 'n')
			g_iters = atoi(optarg);
		else
			return 2;
	}
	if (threads < 1 || threads > MAXW)
		return 2;
	g_dev = open(FASTSOCKET_DEVICE, O_RDWR | O_CLOEXEC);
	if (g_dev < 0) {
		printf("storm: %s: %s\n", FASTSOCKET_DEVICE, strerror(errno));
		return 1;
	}
	for (i = 0; i < threads; i++)
		pthread_create(&th[i], NULL, storm_thread, (void *)(long)i);
	for (i = 0; i < threads; i++)
		pthread_join(th[i], NULL);
	printf("storm: threads=%d iterations=%d calls=%lu ok=%lu\n", threads, g_iters, g_calls, g_okcalls);
	return 0;
}

/* ------------------------------------------------------------------ hostile */

static unsigned long h_calls, h_unexpected;
static char h_first[160];

/* An ioctl that must fail; a success is reported (after the affinity check). */
static void must_fail(const char *what, unsigned long cmd, void *arg)
{
	h_calls++;
	if (ioctl(g_dev, cmd, arg) == 0) {
		h_unexpected++;
		if (!h_first[0])
			snprintf(h_first, sizeof(h_first), "%s succeeded", what);
	}
}

static int mask_widened(const cpu_set_t *before)
{
	cpu_set_t now_set;
	int i;

	if (sched_getaffinity(0, sizeof(now_set), &now_set))
		return 1;
	for (i = 0; i < CPU_SETSIZE; i++)
		if (CPU_ISSET(i, &now_set) && !CPU_ISSET(i, before))
			return 1;
	return 0;
}

static void hostile_fds(int *fds, const char **kinds, int n)
{
	char what[96];
	static const unsigned long cmds[] = { FSOCK_IOC_LISTEN, FSOCK_IOC_SPAWN, FSOCK_IOC_ACCEPT,
					      FSOCK_IOC_CLOSE, FSOCK_IOC_SHUTDOWN };
	union { struct fsock_listen_args l; struct fsock_spawn_args s; struct fsock_accept_args a;
		struct fsock_close_args c; struct fsock_shutdown_args h; uint64_t raw[6]; } u;
	unsigned i, k;

	for (i = 0; i < (unsigned)n; i++)
		for (k = 0; k < sizeof(cmds) / sizeof(cmds[0]); k++) {
			memset(&u, 0, sizeof(u));
			u.raw[0] = (uint32_t)fds[i];	/* fd is the first field of every struct */
			u.s.local_fd = -1;
			snprintf(what, sizeof(what), "ioctl nr %u on %s", (unsigned)(cmds[k] & 0xff), kinds[i]);
			must_fail(what, cmds[k], &u);
		}
}

/* ACCEPT of a unix listener with a connection queued: refused (el6 makes inet sockets
 * only) or a real unix socket (reuseport: the listener's own ops), never an inet socket
 * over a unix one (its close oopsed el6). */
static void hostile_unix_accept(void)
{
	struct sockaddr_un ua = { .sun_family = AF_UNIX };
	struct sockaddr_storage got;
	socklen_t gl = sizeof(got);
	struct fsock_accept_args ac;
	int us = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0), uc = socket(AF_UNIX, SOCK_STREAM, 0), r;

	snprintf(ua.sun_path + 1, sizeof(ua.sun_path) - 1, "fsstress-%d", (int)getpid());
	if (us < 0 || uc < 0 || bind(us, (struct sockaddr *)&ua, sizeof(ua)) || listen(us, 4) ||
	    connect(uc, (struct sockaddr *)&ua, sizeof(ua)))
		return;
	memset(&ac, 0, sizeof(ac));
	ac.fd = us;
	ac.new_fd = -1;
	h_calls++;
	r = ioctl(g_dev, FSOCK_IOC_ACCEPT, &ac);
	if (r >= 0) {
		r = ac.new_fd >= 0 ? ac.new_fd : r;
		if (getsockname(r, (struct sockaddr *)&got, &gl) || got.ss_family != AF_UNIX) {
			h_unexpected++;
			if (!h_first[0])
				snprintf(h_first, sizeof(h_first), "ACCEPT of a unix listener made family %d",
					 (int)got.ss_family);
		}
		close(r);
	}
	close(uc);
	close(us);
}

static int cmd_hostile(int argc, char **argv)
{
	cpu_set_t before;
	int uid = 65534, o, pipefd[2], fds[10], n = 0, cpu, i, cli;
	const char *kinds[10];
	socklen_t alen = sizeof(struct sockaddr_in);
	struct fsock_spawn_args sp;
	struct fsock_accept_args ac;
	static const int cpus[] = { -2, -1000, 1, 2, 3, 63, 64, 4096, INT_MAX, INT_MIN };
	int widened = 0;

	while ((o = getopt(argc, argv, "u:")) != -1)
		if (o == 'u')
			uid = atoi(optarg);
	if (sched_getaffinity(0, sizeof(before), &before))
		return 1;
	if (getuid() == 0 && (setgroups(0, NULL) || setgid(uid) || setuid(uid))) {
		perror("hostile: drop privileges");
		return 1;
	}
	g_dev = open(FASTSOCKET_DEVICE, O_RDWR | O_CLOEXEC);
	if (g_dev < 0) {
		printf("hostile: %s: %s\n", FASTSOCKET_DEVICE, strerror(errno));
		return 1;
	}
	/* wrong fd kinds: none is a TCP listener the caller owns */
	kinds[n] = "fd -1"; fds[n++] = -1;
	kinds[n] = "fd 2^30"; fds[n++] = 1 << 30;
	kinds[n] = "the device fd"; fds[n++] = g_dev;
	kinds[n] = "an epoll fd"; fds[n++] = epoll_create1(0);
	if (pipe(pipefd) == 0) {
		kinds[n] = "a pipe";
		fds[n++] = pipefd[0];
	}
	kinds[n] = "a unix socket"; fds[n++] = socket(AF_UNIX, SOCK_STREAM, 0);
	kinds[n] = "a udp socket"; fds[n++] = socket(AF_INET, SOCK_DGRAM, 0);
	kinds[n] = "a proc file"; fds[n++] = open("/proc/self/stat", O_RDONLY);
	hostile_fds(fds, kinds, n);
	hostile_unix_accept();
	/* wrong sizes and directions of every command number, and NULL / kernel pointers */
	for (i = 0; i < 8; i++) {
		h_calls += 2;
		if (ioctl(g_dev, _IOC(_IOC_READ | _IOC_WRITE, FASTSOCKET_IOC_MAGIC, i, 1), NULL) == 0)
			h_unexpected++;
		if (ioctl(g_dev, _IOC(_IOC_READ | _IOC_WRITE, FASTSOCKET_IOC_MAGIC, i, 4000), NULL) == 0)
			h_unexpected++;
		if (i != 7)	/* SPAWN_ALL takes no argument */
			must_fail("kernel-pointer arg", _IOC(_IOC_READ | _IOC_WRITE, FASTSOCKET_IOC_MAGIC, i,
						  sizeof(struct fsock_spawn_args)), (void *)(uintptr_t)0xffffffff81000000ull);
	}
	must_fail("unknown cmd", _IO(FASTSOCKET_IOC_MAGIC, 0x7f), NULL);
	must_fail("SOCKET NULL", FSOCK_IOC_SOCKET, NULL);
	/* ACCEPT on a real listener, but with kernel-space and unmapped output pointers */
	{
		struct fsock_socket_args s = { AF_INET, SOCK_STREAM, 0, -1 };
		struct fsock_listen_args l;
		struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };

		if (ioctl(g_dev, FSOCK_IOC_SOCKET, &s) == 0) {
			fcntl(s.fd, F_SETFL, O_NONBLOCK);
			bind(s.fd, (struct sockaddr *)&sa, sizeof(sa));
			l.fd = s.fd;
			l.backlog = 8;
			ioctl(g_dev, FSOCK_IOC_LISTEN, &l);
			/* a queued connection, so ACCEPT really writes through the bad pointers */
			getsockname(s.fd, (struct sockaddr *)&sa, &alen);
			cli = socket(AF_INET, SOCK_STREAM, 0);
			if (connect(cli, (struct sockaddr *)&sa, sizeof(sa)) == 0)
				usleep(100000);
			memset(&ac, 0, sizeof(ac));
			ac.fd = s.fd;
			ac.addr = 0xffffffff81000000ull;
			ac.addrlen = 0xffffffff81000100ull;
			must_fail("ACCEPT kernel ptr", FSOCK_IOC_ACCEPT, &ac);
			ac.flags = ~0;
			must_fail("ACCEPT bad flags", FSOCK_IOC_ACCEPT, &ac);
			/* CPUs outside the caller's mask: an error or a no-op, never a wider mask */
			for (i = 0; i < (int)(sizeof(cpus) / sizeof(cpus[0])); i++) {
				memset(&sp, 0, sizeof(sp));
				sp.fd = s.fd;
				sp.cpu = cpus[i];
				sp.local_fd = -1;
				h_calls++;
				cpu = ioctl(g_dev, FSOCK_IOC_SPAWN, &sp);
				if (mask_widened(&before)) {
					widened++;
					if (!h_first[0])
						snprintf(h_first, sizeof(h_first), "SPAWN cpu=%d (rc %d) widened the affinity",
							 cpus[i], cpu);
				}
			}
		}
	}
	printf("hostile: uid=%d calls=%lu unexpected=%lu widened=%d%s%s\n", (int)getuid(), h_calls,
	       h_unexpected, widened, h_first[0] ? " first=" : "", h_first);
	return h_unexpected || widened ? 1 : 0;
}

/* ------------------------------------------------------------------ netns */

static int cmd_netns(int argc, char **argv)
{
	struct ifreq ifr;
	int s;

	if (argc < 2)
		return 2;
	if (unshare(CLONE_NEWNET)) {
		perror("netns: unshare(CLONE_NEWNET)");
		return 1;
	}
	s = socket(AF_INET, SOCK_DGRAM, 0);
	memset(&ifr, 0, sizeof(ifr));
	strcpy(ifr.ifr_name, "lo");
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) || (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr))) {
		perror("netns: lo up");
		return 1;
	}
	close(s);
	execvp(argv[1], argv + 1);
	perror("netns: exec");
	return 127;
}

int main(int argc, char **argv)
{
	if (argc >= 2) {
		const char *c = argv[1];
		if (!strcmp(c, "serve"))
			return cmd_serve(argc - 1, argv + 1);
		if (!strcmp(c, "load"))
			return cmd_load(argc - 1, argv + 1);
		if (!strcmp(c, "storm"))
			return cmd_storm(argc - 1, argv + 1);
		if (!strcmp(c, "hostile"))
			return cmd_hostile(argc - 1, argv + 1);
		if (!strcmp(c, "netns"))
			return cmd_netns(argc - 1, argv + 1);
		if (!strcmp(c, "child"))
			return cmd_child(argc - 1, argv + 1);
	}
	fputs("usage: fsstress serve|load|storm|hostile|netns|child ...\n", stderr);
	return 2;
}
