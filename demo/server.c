/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Fastsocket demo server: a master creates the listen sockets and forks workers pinned
 * to consecutive CPUs; each worker runs an epoll loop (so libsocket's epoll_ctl and
 * accept interception are exercised).  Naive mode answers every request with a small
 * HTTP 200; proxy mode (-x) forwards each request to a backend (round robin) and relays
 * the reply.  The master prints `server: rps=R total=T workers=W` once per second.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXADDR 16
#define MAXWORKERS 256
#define INBUF 16384
#define LISTEN_TAG (1ull << 63)

static const char BODY[] = "Hello from fastsocket\n";

struct addr {
	struct sockaddr_storage ss;
	socklen_t len;
	char text[80];
};

struct stat_slot {
	unsigned long requests;
	unsigned long errors;
	char pad[48]; /* one cache line per worker */
};

enum { C_CLIENT, C_BACKEND };

struct conn {
	int fd;
	int kind;
	struct conn *peer;      /* client <-> backend while proxying */
	char in[INBUF];
	size_t inlen;
	char *out;
	size_t outlen, outoff, outcap;
	int keepalive;          /* client: keep the connection after this response */
	int close_after;        /* close once `out` is flushed */
	int events;             /* current epoll interest */
	long resp_total;        /* backend: header + body length once known, else -1 */
	size_t resp_seen;
	struct conn *next_dead;
};

static struct addr g_listen[MAXADDR], g_backend[MAXADDR];
static int g_nlisten, g_nbackend, g_workers, g_first_core, g_keepalive, g_verbose;
static int g_lfd[MAXADDR];
static FILE *g_log;
static struct stat_slot *g_stats;
static volatile sig_atomic_t g_stop;
static int g_epfd, g_worker_id, g_rr;
static struct conn *g_dead;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: server [-w WORKERS] [-c FIRST_CORE] [-a IP:PORT]... [-x IP:PORT]... [-k]\n"
		"              [-o LOGFILE] [-v]\n"
		"  -w N        worker processes, pinned to consecutive CPUs (default: online CPUs)\n"
		"  -c CORE     CPU of the first worker (default 0)\n"
		"  -a IP:PORT  listen address, repeatable (default 127.0.0.1:8080; port 0 = any)\n"
		"  -x IP:PORT  proxy mode: backend, repeatable (round robin)\n"
		"  -k          HTTP keep-alive\n"
		"  -o FILE     write the per-second statistics and messages to FILE\n"
		"  -v          verbose\n");
}

static void logf_(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(g_log, fmt, ap);
	va_end(ap);
	fflush(g_log);
}

static int parse_addr(const char *s, struct addr *a)
{
	char host[64];
	const char *colon;
	char *end;
	long port;
	size_t hl;

	memset(a, 0, sizeof(*a));
	if (s[0] == '[') {
		const char *rb = strchr(s, ']');
		if (!rb || rb[1] != ':')
			return -1;
		hl = (size_t)(rb - s - 1);
		if (hl >= sizeof(host))
			return -1;
		memcpy(host, s + 1, hl);
		colon = rb + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return -1;
		hl = (size_t)(colon - s);
		if (hl >= sizeof(host))
			return -1;
		memcpy(host, s, hl);
	}
	host[hl] = 0;
	errno = 0;
	port = strtol(colon + 1, &end, 10);
	if (errno || *end || end == colon + 1 || port < 0 || port > 65535)
		return -1;
	if (inet_pton(AF_INET, host, &((struct sockaddr_in *)&a->ss)->sin_addr) == 1) {
		struct sockaddr_in *in = (struct sockaddr_in *)&a->ss;
		in->sin_family = AF_INET;
		in->sin_port = htons((uint16_t)port);
		a->len = sizeof(*in);
	} else if (inet_pton(AF_INET6, host, &((struct sockaddr_in6 *)&a->ss)->sin6_addr) == 1) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&a->ss;
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons((uint16_t)port);
		a->len = sizeof(*in6);
	} else {
		return -1;
	}
	snprintf(a->text, sizeof(a->text), "%s", s);
	return 0;
}

static void addr_text(const struct sockaddr_storage *ss, char *buf, size_t n)
{
	char ip[INET6_ADDRSTRLEN];

	if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const void *)ss;
		inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip));
		snprintf(buf, n, "[%s]:%u", ip, ntohs(in6->sin6_port));
	} else {
		const struct sockaddr_in *in = (const void *)ss;
		inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip));
		snprintf(buf, n, "%s:%u", ip, ntohs(in->sin_port));
	}
}

static int open_listener(struct addr *a)
{
	int one = 1, fd;
	struct sockaddr_storage got;
	socklen_t gl = sizeof(got);

	fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&a->ss, a->len) != 0 || listen(fd, 4096) != 0 ||
	    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0) {
		int e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	if (getsockname(fd, (struct sockaddr *)&got, &gl) == 0)
		addr_text(&got, a->text, sizeof(a->text));
	return fd;
}

/* ---- worker ---- */
static void on_signal(int sig)
{
	(void)sig;
	g_stop = 1;
}

static void set_events(struct conn *c, int ev)
{
	struct epoll_event e = { .events = (uint32_t)ev, .data.ptr = c };

	if (c->events == ev)
		return;
	epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &e);
	c->events = ev;
}

static struct conn *conn_new(int fd, int kind, int ev)
{
	struct conn *c = calloc(1, sizeof(*c));
	struct epoll_event e = { .events = (uint32_t)ev };

	if (!c)
		return NULL;
	c->fd = fd;
	c->kind = kind;
	c->events = ev;
	c->resp_total = -1;
	e.data.ptr = c;
	if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, fd, &e) != 0) {
		free(c);
		return NULL;
	}
	return c;
}

static void conn_close(struct conn *c);

static int out_append(struct conn *c, const char *p, size_t n)
{
	if (c->outlen + n > c->outcap) {
		size_t cap = c->outcap ? c->outcap : 4096;
		char *o;
		while (cap < c->outlen + n)
			cap *= 2;
		o = realloc(c->out, cap);
		if (!o)
			return -1;
		c->out = o;
		c->outcap = cap;
	}
	memcpy(c->out + c->outlen, p, n);
	c->outlen += n;
	return 0;
}

/* Write what we can; returns -1 when the connection was closed. */
static int conn_flush(struct conn *c)
{
	while (c->outoff < c->outlen) {
		ssize_t w = send(c->fd, c->out + c->outoff, c->outlen - c->outoff, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				set_events(c, EPOLLOUT);
				return 0;
			}
			if (errno == EINTR)
				continue;
			conn_close(c);
			return -1;
		}
		c->outoff += (size_t)w;
	}
	c->outoff = c->outlen = 0;
	if (c->close_after) {
		conn_close(c);
		return -1;
	}
	return 0;
}

static void conn_close(struct conn *c)
{
	if (c->fd < 0)
		return;
	epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	c->fd = -1;
	if (c->peer) {
		struct conn *p = c->peer;
		p->peer = NULL;
		c->peer = NULL;
		if (c->kind == C_CLIENT)
			conn_close(p); /* client gone: drop its backend request */
	}
	c->next_dead = g_dead; /* freed after the current epoll batch */
	g_dead = c;
}

static const char *find_hdr(const char *h, size_t n, const char *name)
{
	size_t nl = strlen(name), i;

	for (i = 0; i + nl < n; i++) {
		if ((i == 0 || h[i - 1] == '\n') && strncasecmp(h + i, name, nl) == 0 && h[i + nl] == ':')
			return h + i + nl + 1;
	}
	return NULL;
}

static long content_length(const char *h, size_t n)
{
	const char *v = find_hdr(h, n, "Content-Length");
	return v ? strtol(v, NULL, 10) : -1;
}

static int wants_keepalive(const char *h, size_t n)
{
	const char *v = find_hdr(h, n, "Connection");
	int http11 = n > 16 && memmem(h, n < 200 ? n : 200, "HTTP/1.1", 8) != NULL;

	while (v && (*v == ' ' || *v == '\t'))
		v++;
	if (v && strncasecmp(v, "close", 5) == 0)
		return 0;
	if (v && strncasecmp(v, "keep-alive", 10) == 0)
		return 1;
	return http11;
}

static void count(int err)
{
	struct stat_slot *s = &g_stats[g_worker_id];

	if (err)
		__atomic_store_n(&s->errors, s->errors + 1, __ATOMIC_RELAXED);
	else
		__atomic_store_n(&s->requests, s->requests + 1, __ATOMIC_RELAXED);
}

static void reply_simple(struct conn *c, int code, const char *reason, const char *body)
{
	char hdr[256];
	int n = snprintf(hdr, sizeof(hdr),
			 "HTTP/1.1 %d %s\r\nServer: fastsocket-demo\r\nContent-Type: text/plain\r\n"
			 "Content-Length: %zu\r\nConnection: %s\r\n\r\n",
			 code, reason, strlen(body), c->keepalive ? "keep-alive" : "close");

	if (out_append(c, hdr, (size_t)n) || out_append(c, body, strlen(body))) {
		conn_close(c);
		return;
	}
	if (!c->keepalive)
		c->close_after = 1;
	count(code != 200);
	conn_flush(c);
}

static void proxy_start(struct conn *c, size_t reqlen)
{
	struct addr *b = &g_backend[g_rr++ % g_nbackend];
	int fd = socket(b->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct conn *bc;

	if (fd < 0 || (connect(fd, (struct sockaddr *)&b->ss, b->len) != 0 && errno != EINPROGRESS)) {
		if (fd >= 0)
			close(fd);
		if (g_verbose)
			logf_("server: worker %d: backend %s: %s\n", g_worker_id, b->text, strerror(errno));
		reply_simple(c, 502, "Bad Gateway", "backend unreachable\n");
		return;
	}
	bc = conn_new(fd, C_BACKEND, EPOLLOUT);
	if (!bc || out_append(bc, c->in, reqlen)) {
		if (!bc)
			close(fd);
		else
			conn_close(bc);
		reply_simple(c, 502, "Bad Gateway", "proxy out of memory\n");
		return;
	}
	bc->peer = c;
	c->peer = bc;
	set_events(c, 0); /* the next request waits until this reply is relayed */
}

/* Handle complete requests in the client's input buffer (one at a time in proxy mode). */
static void client_process(struct conn *c)
{
	while (c->fd >= 0 && !c->peer && c->outlen == 0) {
		char *end = memmem(c->in, c->inlen, "\r\n\r\n", 4);
		size_t hl, total;
		long cl;

		if (!end) {
			if (c->inlen == sizeof(c->in)) {
				c->keepalive = 0;
				reply_simple(c, 431, "Request Header Fields Too Large", "too large\n");
			}
			return;
		}
		hl = (size_t)(end - c->in) + 4;
		cl = content_length(c->in, hl);
		total = hl + (cl > 0 ? (size_t)cl : 0);
		if (total > sizeof(c->in)) {
			c->keepalive = 0;
			reply_simple(c, 413, "Payload Too Large", "too large\n");
			return;
		}
		if (c->inlen < total)
			return;
		c->keepalive = g_keepalive && wants_keepalive(c->in, hl);
		if (g_nbackend) {
			proxy_start(c, total);
		} else {
			reply_simple(c, 200, "OK", BODY);
		}
		if (c->fd < 0)
			return;
		memmove(c->in, c->in + total, c->inlen - total);
		c->inlen -= total;
		if (g_nbackend)
			return;
	}
}

static void client_read(struct conn *c)
{
	for (;;) {
		ssize_t r;

		if (c->inlen == sizeof(c->in))
			break;
		r = recv(c->fd, c->in + c->inlen, sizeof(c->in) - c->inlen, 0);
		if (r > 0) {
			c->inlen += (size_t)r;
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			break;
		conn_close(c); /* EOF or error */
		return;
	}
	client_process(c);
}

/* Relay the backend reply into the client's output; done at Content-Length or EOF. */
static void backend_done(struct conn *b, int ok)
{
	struct conn *c = b->peer;

	b->peer = NULL;
	conn_close(b);
	if (!c)
		return;
	c->peer = NULL;
	if (!ok && b->resp_seen == 0) {
		c->keepalive = 0;
		reply_simple(c, 502, "Bad Gateway", "backend failed\n");
		return;
	}
	count(!ok);
	if (!ok || b->resp_total < 0)
		c->keepalive = 0;
	if (!c->keepalive)
		c->close_after = 1;
	if (conn_flush(c) < 0)
		return;
	set_events(c, c->outlen ? EPOLLOUT : EPOLLIN);
	if (c->outlen == 0)
		client_process(c);
}

static void backend_read(struct conn *b)
{
	char buf[16384];
	struct conn *c = b->peer;

	for (;;) {
		ssize_t r = recv(b->fd, buf, sizeof(buf), 0);
		if (r > 0) {
			if (!c || out_append(c, buf, (size_t)r)) {
				backend_done(b, 0);
				return;
			}
			b->resp_seen += (size_t)r;
			if (b->resp_total < 0) {
				char *end = memmem(c->out + c->outoff, c->outlen - c->outoff, "\r\n\r\n", 4);
				if (end) {
					size_t hl = (size_t)(end - (c->out + c->outoff)) + 4;
					long cl = content_length(c->out + c->outoff, hl);
					if (cl >= 0)
						b->resp_total = (long)hl + cl;
				}
			}
			if (b->resp_total >= 0 && b->resp_seen >= (size_t)b->resp_total) {
				backend_done(b, 1);
				return;
			}
			continue;
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		/* EOF ends a reply without Content-Length; anything else is an error */
		backend_done(b, r == 0 && b->resp_seen > 0 && b->resp_total < 0);
		return;
	}
}

static void backend_event(struct conn *b, uint32_t ev)
{
	if (ev & EPOLLOUT) {
		int err = 0;
		socklen_t l = sizeof(err);

		getsockopt(b->fd, SOL_SOCKET, SO_ERROR, &err, &l);
		if (err) {
			if (g_verbose)
				logf_("server: worker %d: backend connect: %s\n", g_worker_id, strerror(err));
			backend_done(b, 0);
			return;
		}
		if (conn_flush(b) < 0)
			return;
		if (b->outlen == 0)
			set_events(b, EPOLLIN);
	}
	if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
		backend_read(b);
}

static void client_event(struct conn *c, uint32_t ev)
{
	if (ev & EPOLLOUT) {
		if (conn_flush(c) < 0)
			return;
		if (c->outlen == 0) {
			set_events(c, c->peer ? 0 : EPOLLIN);
			client_process(c);
		}
	}
	if (c->fd >= 0 && c->peer && (ev & (EPOLLHUP | EPOLLERR)))
		conn_close(c); /* client vanished while its request was at the backend */
	else if (c->fd >= 0 && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !c->peer)
		client_read(c);
}

static void accept_all(int lfd)
{
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC), one = 1;
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN && errno != EWOULDBLOCK && g_verbose)
				logf_("server: worker %d: accept: %s\n", g_worker_id, strerror(errno));
			return;
		}
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		if (!conn_new(fd, C_CLIENT, EPOLLIN))
			close(fd);
	}
}

static int worker_main(int id)
{
	struct epoll_event evs[256];
	struct sigaction sa;
	cpu_set_t set;
	long ncpu = sysconf(_SC_NPROCESSORS_CONF);
	int cpu = (int)((g_first_core + id) % (ncpu > 0 ? ncpu : 1)), i;

	g_worker_id = id;
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (getppid() == 1)
		return 0;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	/* Pin before touching the listen sockets: libsocket spawns the local listener for
	 * the CPU we run on when we first register them with epoll. */
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		logf_("server: worker %d: cannot pin to cpu %d: %s\n", id, cpu, strerror(errno));
	g_epfd = epoll_create1(EPOLL_CLOEXEC);
	if (g_epfd < 0)
		return 1;
	for (i = 0; i < g_nlisten; i++) {
		struct epoll_event e = { .events = EPOLLIN, .data.u64 = LISTEN_TAG | (uint64_t)i };
		if (epoll_ctl(g_epfd, EPOLL_CTL_ADD, g_lfd[i], &e) != 0) {
			logf_("server: worker %d: epoll_ctl: %s\n", id, strerror(errno));
			return 1;
		}
	}
	if (g_verbose)
		logf_("server: worker %d pid %d on cpu %d\n", id, (int)getpid(), cpu);
	while (!g_stop) {
		int n = epoll_wait(g_epfd, evs, 256, 1000);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			logf_("server: worker %d: epoll_wait: %s\n", id, strerror(errno));
			return 1;
		}
		for (i = 0; i < n; i++) {
			uint64_t d = evs[i].data.u64;
			struct conn *c;

			if (d & LISTEN_TAG) {
				accept_all(g_lfd[d & 0xff]);
				continue;
			}
			c = evs[i].data.ptr;
			if (c->fd < 0)
				continue;
			if (c->kind == C_CLIENT)
				client_event(c, evs[i].events);
			else
				backend_event(c, evs[i].events);
		}
		while (g_dead) {
			struct conn *c = g_dead;
			g_dead = c->next_dead;
			free(c->out);
			free(c);
		}
	}
	if (g_verbose)
		logf_("server: worker %d on cpu %d exiting, requests=%lu\n", id, cpu, g_stats[id].requests);
	return 0;
}

/* ---- master ---- */
static pid_t g_pids[MAXWORKERS];

static void stop_workers(void)
{
	int i, left, tries;

	for (i = 0; i < g_workers; i++)
		if (g_pids[i] > 0)
			kill(g_pids[i], SIGTERM);
	for (tries = 0; tries < 50; tries++) {
		left = 0;
		for (i = 0; i < g_workers; i++) {
			if (g_pids[i] > 0 && waitpid(g_pids[i], NULL, WNOHANG) == g_pids[i])
				g_pids[i] = 0;
			left += g_pids[i] > 0;
		}
		if (!left)
			return;
		usleep(100000);
	}
	for (i = 0; i < g_workers; i++)
		if (g_pids[i] > 0) {
			kill(g_pids[i], SIGKILL);
			waitpid(g_pids[i], NULL, 0);
		}
}

static unsigned long total_requests(unsigned long *errors)
{
	unsigned long t = 0, e = 0;
	int i;

	for (i = 0; i < g_workers; i++) {
		t += __atomic_load_n(&g_stats[i].requests, __ATOMIC_RELAXED);
		e += __atomic_load_n(&g_stats[i].errors, __ATOMIC_RELAXED);
	}
	*errors = e;
	return t;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	const char *logfile = NULL;
	unsigned long last = 0, errs;
	double t0;
	int opt, i, alive, rc = 0;
	char *end;

	g_workers = ncpu > 0 ? (int)ncpu : 1;
	while ((opt = getopt(argc, argv, "w:c:a:x:ko:vh")) != -1) {
		switch (opt) {
		case 'w':
			g_workers = (int)strtol(optarg, &end, 10);
			if (*end || g_workers < 1 || g_workers > MAXWORKERS)
				goto bad;
			break;
		case 'c':
			g_first_core = (int)strtol(optarg, &end, 10);
			if (*end || g_first_core < 0)
				goto bad;
			break;
		case 'a':
			if (g_nlisten == MAXADDR || parse_addr(optarg, &g_listen[g_nlisten++]))
				goto bad;
			break;
		case 'x':
			if (g_nbackend == MAXADDR || parse_addr(optarg, &g_backend[g_nbackend++]))
				goto bad;
			break;
		case 'k':
			g_keepalive = 1;
			break;
		case 'o':
			logfile = optarg;
			break;
		case 'v':
			g_verbose++;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			goto bad;
		}
	}
	if (optind != argc)
		goto bad;
	g_log = stdout;
	if (logfile && !(g_log = fopen(logfile, "a"))) {
		fprintf(stderr, "server: %s: %s\n", logfile, strerror(errno));
		return 1;
	}
	if (!g_nlisten)
		parse_addr("127.0.0.1:8080", &g_listen[g_nlisten++]);
	signal(SIGPIPE, SIG_IGN);
	for (i = 0; i < g_nlisten; i++) {
		g_lfd[i] = open_listener(&g_listen[i]);
		if (g_lfd[i] < 0) {
			fprintf(stderr, "server: listen %s: %s\n", g_listen[i].text, strerror(errno));
			return 1;
		}
		logf_("server: listening on %s\n", g_listen[i].text);
	}
	g_stats = mmap(NULL, sizeof(*g_stats) * (size_t)g_workers, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (g_stats == MAP_FAILED) {
		perror("server: mmap");
		return 1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	logf_("server: %s mode, %d workers from cpu %d%s\n", g_nbackend ? "proxy" : "naive",
	      g_workers, g_first_core, g_keepalive ? ", keep-alive" : "");
	for (i = 0; i < g_workers; i++) {
		pid_t p = fork();
		if (p < 0) {
			perror("server: fork");
			stop_workers();
			return 1;
		}
		if (p == 0) {
			int r = worker_main(i);
			fflush(g_log);
			_exit(r);
		}
		g_pids[i] = p;
	}
	t0 = now();
	while (!g_stop) {
		double t;
		unsigned long tot;

		usleep(1000000);
		for (alive = 0, i = 0; i < g_workers; i++) {
			int st;
			if (g_pids[i] > 0 && waitpid(g_pids[i], &st, WNOHANG) == g_pids[i]) {
				logf_("server: worker %d (pid %d) exited with status %d\n", i, (int)g_pids[i],
				      WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
				g_pids[i] = 0;
			}
			alive += g_pids[i] > 0;
		}
		t = now();
		tot = total_requests(&errs);
		logf_("server: rps=%.0f total=%lu errors=%lu workers=%d\n", (double)(tot - last) / (t - t0),
		      tot, errs, alive);
		last = tot;
		t0 = t;
		if (!alive) {
			rc = 1;
			break;
		}
	}
	stop_workers();
	logf_("server: stopped, total=%lu\n", total_requests(&errs));
	return rc;
bad:
	usage(stderr);
	return 2;
}
