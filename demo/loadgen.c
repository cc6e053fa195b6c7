/* SPDX-License-Identifier: GPL-2.0 */
/*
 * loadgen: a small HTTP load client, static-linkable with musl, for places (the QEMU
 * guest) without wrk/ab.  M worker processes (optionally pinned to CPUs) each drive
 * C/M concurrent connections with epoll until N requests are done or D seconds passed.
 * The last line is machine readable:
 *   loadgen: requests=N errors=E rps=R secs=S
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXW 256

enum { S_IDLE, S_CONNECTING, S_SENDING, S_READING };

struct lconn {
	int fd;
	int state;
	size_t sent;
	char buf[16384];
	size_t len;
	long need;        /* total response length once headers are parsed, else -1 */
	double deadline;
};

static struct sockaddr_storage g_addr;
static socklen_t g_alen;
static char g_req[1024];
static size_t g_reqlen;
static int g_keepalive, g_epfd;
static double g_timeout = 5.0;
static unsigned long g_ok, g_err;

static void usage(FILE *f)
{
	fprintf(f,
		"usage: loadgen [-n REQUESTS | -d SECS] [-c CONNS] [-w WORKERS] [-p FIRST_CPU] [-k]\n"
		"               [-t TIMEOUT] URL\n"
		"  URL is http://IP:PORT/path (IP literal, v4 or [v6]); default -n 1000 -c 10 -w 1\n"
		"  -k keep-alive (HTTP/1.1), otherwise one HTTP/1.0 request per connection\n"
		"  -p pin worker i to CPU FIRST_CPU+i\n");
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int parse_url(const char *url, char *hostport, size_t hn, char *path, size_t pn)
{
	const char *p = url, *slash, *colon;
	char host[64];
	long port = 80;
	size_t hl;

	if (strncmp(p, "http://", 7) == 0)
		p += 7;
	slash = strchr(p, '/');
	hl = slash ? (size_t)(slash - p) : strlen(p);
	if (hl == 0 || hl >= hn)
		return -1;
	memcpy(hostport, p, hl);
	hostport[hl] = 0;
	snprintf(path, pn, "%s", slash ? slash : "/");
	if (hostport[0] == '[') {
		char *rb = strchr(hostport, ']');
		if (!rb || (size_t)(rb - hostport - 1) >= sizeof(host))
			return -1;
		memcpy(host, hostport + 1, (size_t)(rb - hostport - 1));
		host[rb - hostport - 1] = 0;
		colon = rb[1] == ':' ? rb + 1 : NULL;
	} else {
		colon = strrchr(hostport, ':');
		hl = colon ? (size_t)(colon - hostport) : strlen(hostport);
		if (hl >= sizeof(host))
			return -1;
		memcpy(host, hostport, hl);
		host[hl] = 0;
	}
	if (colon) {
		char *end;
		port = strtol(colon + 1, &end, 10);
		if (*end || port <= 0 || port > 65535)
			return -1;
	}
	memset(&g_addr, 0, sizeof(g_addr));
	if (inet_pton(AF_INET, host, &((struct sockaddr_in *)&g_addr)->sin_addr) == 1) {
		((struct sockaddr_in *)&g_addr)->sin_family = AF_INET;
		((struct sockaddr_in *)&g_addr)->sin_port = htons((uint16_t)port);
		g_alen = sizeof(struct sockaddr_in);
	} else if (inet_pton(AF_INET6, host, &((struct sockaddr_in6 *)&g_addr)->sin6_addr) == 1) {
		((struct sockaddr_in6 *)&g_addr)->sin6_family = AF_INET6;
		((struct sockaddr_in6 *)&g_addr)->sin6_port = htons((uint16_t)port);
		g_alen = sizeof(struct sockaddr_in6);
	} else {
		return -1;
	}
	return 0;
}

static void drop(struct lconn *c)
{
	if (c->fd >= 0) {
		epoll_ctl(g_epfd, EPOLL_CTL_DEL, c->fd, NULL);
		close(c->fd);
	}
	c->fd = -1;
	c->state = S_IDLE;
}

static int start_conn(struct lconn *c)
{
	struct epoll_event ev = { .events = EPOLLOUT, .data.ptr = c };
	int one = 1;

	c->fd = socket(g_addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		return -1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(c->fd, (struct sockaddr *)&g_addr, g_alen) != 0 && errno != EINPROGRESS) {
		close(c->fd);
		c->fd = -1;
		return -1;
	}
	epoll_ctl(g_epfd, EPOLL_CTL_ADD, c->fd, &ev);
	c->state = S_CONNECTING;
	return 0;
}

/* Begin one request on c (reusing its connection when keep-alive left it open). */
static int start_request(struct lconn *c, double t)
{
	c->sent = 0;
	c->len = 0;
	c->need = -1;
	c->deadline = t + g_timeout;
	if (c->fd < 0)
		return start_conn(c);
	c->state = S_SENDING;
	{
		struct epoll_event ev = { .events = EPOLLOUT, .data.ptr = c };
		epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &ev);
	}
	return 0;
}

/* 1: response complete, 0: need more, -1: malformed */
static int parse_response(struct lconn *c, int eof)
{
	char *end;

	if (c->need < 0) {
		end = memmem(c->buf, c->len, "\r\n\r\n", 4);
		if (!end)
			return eof ? -1 : 0;
		if (c->len < 12 || strncmp(c->buf, "HTTP/1.", 7) != 0)
			return -1;
		{
			size_t hl = (size_t)(end - c->buf) + 4, i;
			long cl = -1;
			for (i = 0; i + 15 < hl; i++)
				if (c->buf[i] == '\n' && strncasecmp(c->buf + i + 1, "Content-Length:", 15) == 0) {
					cl = strtol(c->buf + i + 16, NULL, 10);
					break;
				}
			c->need = cl >= 0 ? (long)hl + cl : 0x7fffffffL;
		}
	}
	if ((long)c->len >= c->need)
		return 1;
	if (eof)
		return c->need == 0x7fffffffL ? 1 : -1;
	return 0;
}

static int status_ok(const struct lconn *c)
{
	return c->len > 12 && c->buf[9] == '2';
}

/* Returns 1 when a request finished (ok or error). */
static int on_event(struct lconn *c, uint32_t events)
{
	if (c->state == S_CONNECTING) {
		int err = 0;
		socklen_t l = sizeof(err);
		getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
		if (err || (events & EPOLLERR)) {
			drop(c);
			g_err++;
			return 1;
		}
		c->state = S_SENDING;
	}
	if (c->state == S_SENDING) {
		while (c->sent < g_reqlen) {
			ssize_t w = send(c->fd, g_req + c->sent, g_reqlen - c->sent, MSG_NOSIGNAL);
			if (w < 0) {
				if (errno == EAGAIN)
					return 0;
				drop(c);
				g_err++;
				return 1;
			}
			c->sent += (size_t)w;
		}
		{
			struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
			epoll_ctl(g_epfd, EPOLL_CTL_MOD, c->fd, &ev);
		}
		c->state = S_READING;
		return 0;
	}
	if (c->state == S_READING) {
		for (;;) {
			ssize_t r;
			int done;

			if (c->len == sizeof(c->buf)) { /* keep the headers, count the body */
				if (c->need < 0) {
					g_err++;
					drop(c);
					return 1;
				}
				c->len = sizeof(c->buf) / 2;
				c->need -= (long)(sizeof(c->buf) / 2);
			}
			r = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
			if (r < 0 && errno == EAGAIN)
				return 0;
			if (r < 0 && errno == EINTR)
				continue;
			if (r > 0)
				c->len += (size_t)r;
			done = parse_response(c, r <= 0);
			if (done == 0 && r > 0)
				continue;
			if (done == 1 && status_ok(c)) {
				g_ok++;
				/* the server may still close a keep-alive connection: reconnect then */
				if (!g_keepalive || r <= 0 || memmem(c->buf, c->len, "onnection: close", 16))
					drop(c);
			} else {
				g_err++;
				drop(c);
			}
			return 1;
		}
	}
	return 0;
}

static void worker(int id, long quota, double secs, int conns, int pin, int outfd)
{
	struct lconn *cs = calloc((size_t)conns, sizeof(*cs));
	struct epoll_event evs[256];
	long started = 0, finished = 0;
	double t0 = now(), end = t0 + secs;
	char line[128];
	int i, n, active = 0;
	ssize_t w;

	if (pin >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET(pin + id, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	g_epfd = epoll_create1(EPOLL_CLOEXEC);
	if (!cs || g_epfd < 0)
		_exit(1);
	for (i = 0; i < conns; i++) {
		cs[i].fd = -1;
		if ((quota < 0 || started < quota) && (secs <= 0 || now() < end)) {
			started++;
			active++;
			if (start_request(&cs[i], now()) != 0) {
				g_err++;
				finished++;
				active--;
			}
		}
	}
	while (active > 0) {
		double t = now();
		n = epoll_wait(g_epfd, evs, 256, 100);
		t = now();
		for (i = 0; i < n; i++) {
			struct lconn *c = evs[i].data.ptr;
			if (c->state == S_IDLE)
				continue;
			if (on_event(c, evs[i].events)) {
				finished++;
				active--;
				c->state = S_IDLE;
				if ((quota < 0 || started < quota) && (secs <= 0 || t < end)) {
					started++;
					active++;
					if (start_request(c, t) != 0) {
						g_err++;
						finished++;
						active--;
					}
				}
			}
		}
		for (i = 0; i < conns; i++) { /* timeouts */
			if (cs[i].state != S_IDLE && t > cs[i].deadline) {
				drop(&cs[i]);
				g_err++;
				finished++;
				active--;
			}
		}
		/* connections that failed to start still have quota to use */
		for (i = 0; i < conns && active < conns; i++) {
			if (cs[i].state == S_IDLE && (quota < 0 || started < quota) && (secs <= 0 || t < end)) {
				started++;
				active++;
				if (start_request(&cs[i], t) != 0) {
					g_err++;
					finished++;
					active--;
					break;
				}
			}
		}
	}
	n = snprintf(line, sizeof(line), "%lu %lu\n", g_ok, g_err);
	w = write(outfd, line, (size_t)n);
	(void)w;
	_exit(0);
}

int main(int argc, char **argv)
{
	long total = -1;
	double secs = 0, t0, el;
	int conns = 10, workers = 1, pin = -1, opt, i, pfd[2];
	char hostport[128], path[512], *end;
	unsigned long ok = 0, err = 0;
	pid_t pids[MAXW];
	FILE *in;

	while ((opt = getopt(argc, argv, "n:d:c:w:p:kt:h")) != -1) {
		switch (opt) {
		case 'n': total = strtol(optarg, &end, 10); if (*end || total < 1) goto bad; break;
		case 'd': secs = strtod(optarg, &end); if (*end || secs <= 0) goto bad; break;
		case 'c': conns = (int)strtol(optarg, &end, 10); if (*end || conns < 1) goto bad; break;
		case 'w': workers = (int)strtol(optarg, &end, 10); if (*end || workers < 1 || workers > MAXW) goto bad; break;
		case 'p': pin = (int)strtol(optarg, &end, 10); if (*end || pin < 0) goto bad; break;
		case 'k': g_keepalive = 1; break;
		case 't': g_timeout = strtod(optarg, &end); if (*end || g_timeout <= 0) goto bad; break;
		case 'h': usage(stdout); return 0;
		default: goto bad;
		}
	}
	if (optind != argc - 1 || parse_url(argv[optind], hostport, sizeof(hostport), path, sizeof(path)))
		goto bad;
	if (total < 0 && secs <= 0)
		total = 1000;
	if (conns < workers)
		workers = conns;
	if (g_keepalive)
		g_reqlen = (size_t)snprintf(g_req, sizeof(g_req),
					    "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: loadgen\r\n\r\n", path, hostport);
	else
		g_reqlen = (size_t)snprintf(g_req, sizeof(g_req),
					    "GET %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: loadgen\r\n\r\n", path, hostport);
	signal(SIGPIPE, SIG_IGN);
	if (pipe(pfd) != 0) {
		perror("loadgen: pipe");
		return 1;
	}
	t0 = now();
	for (i = 0; i < workers; i++) {
		long quota = total < 0 ? -1 : total / workers + (i < total % workers);
		int wc = conns / workers + (i < conns % workers);
		pids[i] = fork();
		if (pids[i] == 0) {
			close(pfd[0]);
			worker(i, quota, secs, wc, pin, pfd[1]);
		}
		if (pids[i] < 0) {
			perror("loadgen: fork");
			return 1;
		}
	}
	close(pfd[1]);
	in = fdopen(pfd[0], "r");
	for (i = 0; i < workers; i++) {
		unsigned long o, e;
		if (in && fscanf(in, "%lu %lu", &o, &e) == 2) {
			ok += o;
			err += e;
		}
	}
	for (i = 0; i < workers; i++) {
		int st;
		waitpid(pids[i], &st, 0);
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
			err++;
	}
	el = now() - t0;
	printf("loadgen: workers=%d conns=%d keepalive=%d url=http://%s%s\n", workers, conns,
	       g_keepalive, hostport, path);
	printf("loadgen: requests=%lu errors=%lu rps=%.0f secs=%.3f\n", ok, err, el > 0 ? ok / el : 0.0, el);
	return err ? 1 : 0;
bad:
	usage(stderr);
	return 2;
}
