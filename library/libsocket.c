/* SPDX-License-Identifier: GPL-2.0 */
/*
 * libsocket.so: LD_PRELOAD interposer that routes TCP sockets through the Fastsocket
 * module (/dev/fastsocket, ABI in module/fastsocket_abi.h).
 *
 * Three modes, chosen once per process image (thread-safe lazy init):
 *   module    /dev/fastsocket present with our ABI: socket/listen/accept/close/shutdown
 *             of TCP sockets go through ioctls, listeners are spawned per CPU.
 *   portable  FASTSOCKET_PORTABLE=1 and no module (Linux >= 3.9): pinned workers get
 *             their own SO_REUSEPORT listener, steered per CPU by a CBPF program (>= 4.5).
 *   plain     everything else: every call goes straight to libc.  Never exits, never
 *             changes behaviour; one warning line on stderr (FASTSOCKET_QUIET=1 hides it).
 *
 * Only fds the library created or saw listening are tracked (a two-level table indexed
 * by fd), so close/accept of anything else costs one table probe and the libc call.
 * accept never changes the application's O_NONBLOCK setting.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
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
#include <sys/types.h>
#include <unistd.h>

#include "fastsocket_abi.h"

#ifndef SO_REUSEPORT
#define SO_REUSEPORT 15
#endif
#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif
/* Classic BPF, spelled out so that no kernel headers are needed (musl-gcc has none). */
struct fs_filter {
	uint16_t code;
	uint8_t jt, jf;
	uint32_t k;
};
struct fs_fprog {
	unsigned short len;
	struct fs_filter *filter;
};
#define FS_LD_W_ABS 0x20   /* BPF_LD | BPF_W | BPF_ABS */
#define FS_JEQ_K    0x15   /* BPF_JMP | BPF_JEQ | BPF_K */
#define FS_RET_K    0x06   /* BPF_RET | BPF_K */
#define FS_AD_CPU   (-0x1000 + 36) /* SKF_AD_OFF + SKF_AD_CPU */

#define EXPORT __attribute__((visibility("default")))

enum { MODE_PLAIN = 0, MODE_MODULE = 1, MODE_PORTABLE = 2 };

/* Per-fd flags. */
#define F_FS       1u  /* socket created by the module: close/shutdown via ioctl */
#define F_LISTEN   2u  /* listening socket we manage */
#define F_SPAWNED  4u  /* a local (per-CPU) listener exists for the owner process */

struct fdent {
	uint32_t flags;     /* atomic; 0 = untracked */
	int local_fd;       /* local listener fd in process `owner`, or -1 */
	pid_t owner;        /* process that made the spawn decision (0 = none yet) */
	int backlog;
	struct pgroup *grp; /* portable mode: state shared by all forks of this listener */
};

#define CHUNK_BITS 10
#define CHUNK (1 << CHUNK_BITS)
#define NCHUNKS 1024 /* fds below 1M are tracked; larger ones stay plain */
static struct fdent *g_chunks[NCHUNKS];

/* Portable mode: one shared page per listener, inherited across fork, mirroring the
 * kernel's reuseport group so the CBPF program can map CPU -> socket index. */
#define MAXG 1000
struct pgroup {
	pthread_mutex_t mu;     /* process-shared, robust */
	int nsocks;             /* sockets in the kernel group; index 0 is the inherited one */
	int steer;              /* 1 while the CBPF program is attached */
	int cpu_of[MAXG];
	pid_t pid_of[MAXG];
};

static int (*real_socket)(int, int, int);
static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_listen)(int, int);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*real_close)(int);
static int (*real_shutdown)(int, int);
static pid_t (*real_fork)(void);
static int (*real_epoll_ctl)(int, int, int, struct epoll_event *);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_ready;      /* atomic: init finished */
static int g_mode;       /* MODE_* */
static int g_devfd = -1; /* /dev/fastsocket in module mode */
static int g_tracking;   /* atomic: some fd was ever tracked (skips probes otherwise) */
static pid_t g_pid;      /* cached getpid(), refreshed in the child after fork */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* slow-path state changes */

/* ---- fallbacks when dlsym cannot find a symbol (static oddities) ---- */
static int sys_close(int fd) { return (int)syscall(SYS_close, fd); }
static int sys_accept4(int fd, struct sockaddr *a, socklen_t *l, int f)
{
	return (int)syscall(SYS_accept4, fd, a, l, f);
}
static int sys_accept(int fd, struct sockaddr *a, socklen_t *l) { return sys_accept4(fd, a, l, 0); }
static int sys_socket(int d, int t, int p) { return (int)syscall(SYS_socket, d, t, p); }
static int sys_bind(int fd, const struct sockaddr *a, socklen_t l) { return (int)syscall(SYS_bind, fd, a, l); }
static int sys_listen(int fd, int b) { return (int)syscall(SYS_listen, fd, b); }
static int sys_shutdown(int fd, int h) { return (int)syscall(SYS_shutdown, fd, h); }
static int sys_epoll_ctl(int e, int o, int fd, struct epoll_event *ev)
{
	return (int)syscall(SYS_epoll_ctl, e, o, fd, ev);
}
static int sys_dup3(int o, int n, int f) { return (int)syscall(SYS_dup3, o, n, f); }
static int sys_dup2(int o, int n)
{
	if (o == n)
		return fcntl(o, F_GETFD) < 0 ? -1 : n;
	return sys_dup3(o, n, 0);
}
static pid_t sys_fork(void) { return (pid_t)syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0); }

#define RESOLVE(name)                                             \
	do {                                                      \
		*(void **)&real_##name = dlsym(RTLD_NEXT, #name); \
		if (!real_##name)                                 \
			real_##name = sys_##name;                 \
	} while (0)

static void say(const char *msg)
{
	const char *q = getenv("FASTSOCKET_QUIET");
	ssize_t r;

	if (q && *q && strcmp(q, "0") != 0)
		return;
	r = write(2, msg, strlen(msg));
	(void)r;
}

static int env_on(const char *name)
{
	const char *v = getenv(name);
	return v && *v && strcmp(v, "0") != 0;
}

static void atfork_prepare(void) { pthread_mutex_lock(&g_mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&g_mu); }

/* A child must not keep the parent's local listeners alive: a helper process that never
 * accepts would otherwise hold a queue the steering keeps feeding.  The child spawns its
 * own on first use (owner != its pid). */
static void atfork_child(void)
{
	int c, i;

	g_pid = (pid_t)syscall(SYS_getpid);
	pthread_mutex_init(&g_mu, NULL);
	for (c = 0; c < NCHUNKS; c++) {
		struct fdent *ch = g_chunks[c];
		if (!ch)
			continue;
		for (i = 0; i < CHUNK; i++) {
			if (ch[i].local_fd < 0)
				continue;
			sys_close(ch[i].local_fd);
			ch[i].local_fd = -1;
			ch[i].flags &= ~F_SPAWNED;
		}
	}
}

static int query_version(struct fsock_version *v)
{
	memset(v, 0, sizeof(*v));
	return ioctl(g_devfd, FSOCK_IOC_VERSION, v);
}

static void init(void)
{
	char msg[512], why[128];
	const char *dev;
	struct fsock_version v;
	int fd, portable;

	RESOLVE(socket);
	RESOLVE(bind);
	RESOLVE(listen);
	RESOLVE(accept);
	RESOLVE(accept4);
	RESOLVE(close);
	RESOLVE(shutdown);
	RESOLVE(fork);
	RESOLVE(epoll_ctl);
	RESOLVE(dup2);
	RESOLVE(dup3);
	g_pid = (pid_t)syscall(SYS_getpid);
	pthread_atfork(atfork_prepare, atfork_parent, atfork_child);

	g_mode = MODE_PLAIN;
	if (env_on("FASTSOCKET_DISABLE"))
		goto out;
	portable = env_on("FASTSOCKET_PORTABLE");
	/* FASTSOCKET_DEVICE: another device node (tests, chroots); default /dev/fastsocket */
	dev = getenv("FASTSOCKET_DEVICE");
	if (!dev || !*dev)
		dev = FASTSOCKET_DEVICE;
	fd = open(dev, O_RDWR | O_CLOEXEC);
	if (fd >= 0) {
		g_devfd = fd;
		if (query_version(&v) == 0 && v.abi == FASTSOCKET_ABI_VERSION) {
			g_mode = MODE_MODULE;
			goto out;
		}
		if (v.abi)
			snprintf(why, sizeof(why), "module ABI %u, library ABI %d", v.abi,
				 FASTSOCKET_ABI_VERSION);
		else
			snprintf(why, sizeof(why), "version query failed: %s", strerror(errno));
		real_close(fd);
		g_devfd = -1;
	} else {
		snprintf(why, sizeof(why), "%s", strerror(errno));
	}
	snprintf(msg, sizeof(msg), "libsocket: %s: %s; using %s sockets (FASTSOCKET_QUIET=1 hides this)\n",
		 dev, why, portable ? "portable SO_REUSEPORT" : "plain");
	say(msg);
	if (portable)
		g_mode = MODE_PORTABLE;
out:
	__atomic_store_n(&g_ready, 1, __ATOMIC_RELEASE);
}

static inline void ensure(void)
{
	if (__builtin_expect(!__atomic_load_n(&g_ready, __ATOMIC_ACQUIRE), 0))
		pthread_once(&g_once, init);
}

__attribute__((constructor)) static void libsocket_ctor(void) { ensure(); }

/* ---- fd table ---- */
static struct fdent *ent_get(int fd)
{
	struct fdent *c;

	if (fd < 0 || fd >= NCHUNKS * CHUNK)
		return NULL;
	c = __atomic_load_n(&g_chunks[fd >> CHUNK_BITS], __ATOMIC_ACQUIRE);
	return c ? &c[fd & (CHUNK - 1)] : NULL;
}

static struct fdent *ent_make(int fd)
{
	struct fdent *c, *want = NULL;
	int i;

	if (fd < 0 || fd >= NCHUNKS * CHUNK)
		return NULL;
	c = __atomic_load_n(&g_chunks[fd >> CHUNK_BITS], __ATOMIC_ACQUIRE);
	if (!c) {
		c = calloc(CHUNK, sizeof(*c));
		if (!c)
			return NULL;
		for (i = 0; i < CHUNK; i++)
			c[i].local_fd = -1;
		if (!__atomic_compare_exchange_n(&g_chunks[fd >> CHUNK_BITS], &want, c, 0,
						 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
			free(c);
			c = want;
		}
	}
	__atomic_store_n(&g_tracking, 1, __ATOMIC_RELEASE);
	return &c[fd & (CHUNK - 1)];
}

static inline uint32_t ent_flags(struct fdent *e)
{
	return e ? __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) : 0;
}

/* Fields are written before the flags are published (release), read after (acquire). */
static void track(int fd, uint32_t flags)
{
	struct fdent *e = ent_make(fd);

	if (!e)
		return;
	e->local_fd = -1;
	e->owner = 0;
	e->backlog = SOMAXCONN;
	e->grp = NULL;
	__atomic_store_n(&e->flags, flags, __ATOMIC_RELEASE);
}

static inline struct fdent *tracked(int fd)
{
	struct fdent *e;

	if (!__atomic_load_n(&g_tracking, __ATOMIC_ACQUIRE))
		return NULL;
	e = ent_get(fd);
	return ent_flags(e) ? e : NULL;
}

static int pinned_cpu(void)
{
	cpu_set_t set;
	int i;

	if (sched_getaffinity(0, sizeof(set), &set) != 0 || CPU_COUNT(&set) != 1)
		return -1;
	for (i = 0; i < CPU_SETSIZE; i++)
		if (CPU_ISSET(i, &set))
			return i;
	return -1;
}

static int not_supported(int err)
{
	return err == ENOTTY || err == ENOSYS || err == EOPNOTSUPP || err == EINVAL;
}

/* ---- portable mode: reuseport group mirror ---- */
static int grp_lock(struct pgroup *g)
{
	int r = pthread_mutex_lock(&g->mu);

	if (r == EOWNERDEAD) { /* a worker died holding it: the table is still consistent */
		pthread_mutex_consistent(&g->mu);
		r = 0;
	}
	return r;
}

static struct pgroup *grp_new(void)
{
	pthread_mutexattr_t a;
	struct pgroup *g = mmap(NULL, sizeof(*g), PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (g == MAP_FAILED)
		return NULL;
	pthread_mutexattr_init(&a);
	pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
	pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
	pthread_mutex_init(&g->mu, &a);
	pthread_mutexattr_destroy(&a);
	g->nsocks = 1; /* the application's socket: first member of the group */
	g->cpu_of[0] = -1;
	return g;
}

/* CPU -> group index as a jump list: `ld cpu; jeq #c,ret #i ...; ret #~0`.
 * An index beyond the group makes the kernel fall back to its hash. */
static void grp_attach(int s, struct pgroup *g)
{
	struct fs_filter f[2 + 2 * MAXG];
	struct fs_fprog prog;
	int i, n = 0;

	f[n++] = (struct fs_filter){ FS_LD_W_ABS, 0, 0, (uint32_t)FS_AD_CPU };
	for (i = 1; i < g->nsocks; i++) {
		if (g->cpu_of[i] < 0)
			continue;
		f[n++] = (struct fs_filter){ FS_JEQ_K, 0, 1, (uint32_t)g->cpu_of[i] };
		f[n++] = (struct fs_filter){ FS_RET_K, 0, 0, (uint32_t)i };
	}
	f[n++] = (struct fs_filter){ FS_RET_K, 0, 0, 0xffffffffu };
	prog.len = (unsigned short)n;
	prog.filter = f;
	g->steer = setsockopt(s, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog)) == 0;
}

/* The kernel fills a removed slot with the last member; mirror that, and re-attach the
 * program through our socket before it leaves (the program belongs to the group). */
static void grp_leave(struct pgroup *g, int s)
{
	int i, last;

	if (grp_lock(g)) {
		real_close(s);
		return;
	}
	for (i = 1; i < g->nsocks; i++) {
		if (g->pid_of[i] != g_pid)
			continue;
		last = g->nsocks - 1;
		g->cpu_of[i] = g->cpu_of[last];
		g->pid_of[i] = g->pid_of[last];
		g->nsocks--;
		if (g->steer)
			grp_attach(s, g);
		break;
	}
	real_close(s); /* leaves the kernel group while we hold the lock */
	pthread_mutex_unlock(&g->mu);
}

static void copy_opt(int from, int to, int level, int name)
{
	int v;
	socklen_t l = sizeof(v);

	if (getsockopt(from, level, name, &v, &l) == 0 && l == sizeof(v))
		setsockopt(to, level, name, &v, l);
}

/* Give this pinned worker its own listener bound like the inherited one.  The inherited
 * socket stays open and keeps being accepted from: it is the global queue for
 * connections that arrived before the group existed or on CPUs without a worker. */
static void portable_spawn(int fd, struct fdent *e)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	struct pgroup *g = e->grp;
	int one = 1, cpu, fl, s;
	char dev[64];
	socklen_t dl = sizeof(dev);

	cpu = pinned_cpu();
	fl = fcntl(fd, F_GETFL);
	/* Blocking accept() on the shared socket could sleep while our own queue fills,
	 * so only non-blocking (event-driven) listeners are split. */
	if (!g || cpu < 0 || cpu >= 65536 || fl < 0 || !(fl & O_NONBLOCK))
		return;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0)
		return;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0)
		return; /* kernel < 3.9 */
	s = real_socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (s < 0)
		return;
	copy_opt(fd, s, SOL_SOCKET, SO_REUSEADDR);
	copy_opt(fd, s, SOL_SOCKET, SO_KEEPALIVE);
	copy_opt(fd, s, SOL_SOCKET, SO_RCVBUF);
	copy_opt(fd, s, SOL_SOCKET, SO_SNDBUF);
	copy_opt(fd, s, IPPROTO_TCP, TCP_NODELAY);
	copy_opt(fd, s, IPPROTO_TCP, TCP_DEFER_ACCEPT);
	copy_opt(fd, s, IPPROTO_TCP, TCP_MAXSEG);
#ifdef TCP_FASTOPEN
	copy_opt(fd, s, IPPROTO_TCP, TCP_FASTOPEN);
#endif
	if (ss.ss_family == AF_INET6)
		copy_opt(fd, s, IPPROTO_IPV6, IPV6_V6ONLY);
	if (getsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, dev, &dl) == 0 && dl > 1)
		setsockopt(s, SOL_SOCKET, SO_BINDTODEVICE, dev, dl);
	setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (grp_lock(g)) {
		real_close(s);
		return;
	}
	if (g->nsocks >= MAXG || real_bind(s, (struct sockaddr *)&ss, sl) != 0 ||
	    real_listen(s, e->backlog) != 0) {
		pthread_mutex_unlock(&g->mu);
		real_close(s);
		return;
	}
	g->cpu_of[g->nsocks] = cpu;
	g->pid_of[g->nsocks] = g_pid;
	g->nsocks++;
	grp_attach(s, g);
	pthread_mutex_unlock(&g->mu);
	e->local_fd = s;
	__atomic_or_fetch(&e->flags, F_SPAWNED, __ATOMIC_RELEASE);
}

/* ---- module mode ---- */
static void module_spawn(int fd, struct fdent *e)
{
	struct fsock_version v;
	struct fsock_spawn_args a;

	if (query_version(&v) != 0)
		return;
	if (!(v.listen_spawn == 2 || (v.listen_spawn == 1 && pinned_cpu() >= 0)))
		return;
	memset(&a, 0, sizeof(a));
	a.fd = fd;
	a.cpu = -1;
	a.local_fd = -1;
	if (ioctl(g_devfd, FSOCK_IOC_SPAWN, &a) != 0)
		return;
	e->local_fd = a.local_fd;
	__atomic_or_fetch(&e->flags, F_SPAWNED, __ATOMIC_RELEASE);
}

/* Spawn decision, once per listener and process: a forked child drops its copy of the
 * parent's local listener and spawns for the CPU it runs on.  Caller: F_LISTEN set. */
static void spawn_once(int fd, struct fdent *e, int from_epoll)
{
	if (__atomic_load_n(&e->owner, __ATOMIC_ACQUIRE) == g_pid)
		return;
	/* Portable local sockets are only visible to epoll users: a poll()/accept() loop
	 * would never look at them, so only epoll_ctl may create one. */
	if (g_mode == MODE_PORTABLE && !from_epoll)
		return;
	pthread_mutex_lock(&g_mu);
	if (e->owner != g_pid) {
		if (e->local_fd >= 0)
			real_close(e->local_fd); /* inherited copy; the parent keeps its own */
		e->local_fd = -1;
		__atomic_and_fetch(&e->flags, ~F_SPAWNED, __ATOMIC_RELEASE);
		if (g_mode == MODE_MODULE)
			module_spawn(fd, e);
		else
			portable_spawn(fd, e);
		__atomic_store_n(&e->owner, g_pid, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&g_mu);
}

/* Forget a tracked fd and release its local listener (the fd itself stays open). */
static uint32_t untrack(int fd, struct fdent *e)
{
	uint32_t fl;
	int lfd;
	pid_t owner;
	struct pgroup *g;

	(void)fd;
	pthread_mutex_lock(&g_mu);
	fl = __atomic_exchange_n(&e->flags, 0, __ATOMIC_ACQ_REL);
	lfd = e->local_fd;
	owner = e->owner;
	g = e->grp;
	e->local_fd = -1;
	e->owner = 0;
	e->grp = NULL;
	pthread_mutex_unlock(&g_mu);
	if (lfd >= 0) {
		if (owner != g_pid) {
			real_close(lfd);
		} else if (g_mode == MODE_MODULE) {
			struct fsock_close_args c = { .fd = lfd };
			if (ioctl(g_devfd, FSOCK_IOC_CLOSE, &c) != 0 && errno != EBADF)
				real_close(lfd);
		} else if (g) {
			grp_leave(g, lfd);
		} else {
			real_close(lfd);
		}
	}
	if (g)
		munmap(g, sizeof(*g));
	return fl;
}

static int is_inet_stream(int domain, int type)
{
	return (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM;
}

/* ---- interposers ---- */
EXPORT int socket(int domain, int type, int protocol)
{
	ensure();
	if (g_mode == MODE_MODULE && is_inet_stream(domain, type)) {
		struct fsock_socket_args a = { .family = domain, .type = type, .protocol = protocol, .fd = -1 };
		int r = ioctl(g_devfd, FSOCK_IOC_SOCKET, &a);
		int fd = a.fd >= 0 ? a.fd : r;

		if (r >= 0 && fd >= 0) {
			track(fd, F_FS);
			return fd;
		}
	}
	return real_socket(domain, type, protocol);
}

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
	ensure();
	return real_bind(fd, addr, len);
}

static int portable_listen(int fd, int backlog)
{
	int r = real_listen(fd, backlog), v = 0, type = 0;
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss), vl = sizeof(v), tl = sizeof(type);
	struct fdent *e;

	if (r != 0 || tracked(fd))
		return r;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 ||
	    (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) ||
	    getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM)
		return r;
	/* Applications doing their own SO_REUSEPORT keep full control of their group. */
	if (getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &v, &vl) == 0 && v)
		return r;
	pthread_mutex_lock(&g_mu);
	e = ent_make(fd);
	if (e) {
		e->local_fd = -1;
		e->owner = 0;
		e->backlog = backlog;
		e->grp = grp_new();
		__atomic_store_n(&e->flags, F_LISTEN, __ATOMIC_RELEASE);
	}
	pthread_mutex_unlock(&g_mu);
	return r;
}

EXPORT int listen(int fd, int backlog)
{
	struct fdent *e;

	ensure();
	if (g_mode == MODE_PORTABLE)
		return portable_listen(fd, backlog);
	e = g_mode == MODE_MODULE ? tracked(fd) : NULL;
	if (e && (ent_flags(e) & F_FS)) {
		struct fsock_listen_args a = { .fd = fd, .backlog = backlog };

		if (ioctl(g_devfd, FSOCK_IOC_LISTEN, &a) != 0) {
			if (!not_supported(errno))
				return -1;
			if (real_listen(fd, backlog) != 0)
				return -1;
		}
		e->backlog = backlog;
		__atomic_or_fetch(&e->flags, F_LISTEN, __ATOMIC_RELEASE);
		/* An unpinned caller is usually a master about to fork workers: spawning now
		 * would (in mode 2) pin it, and every worker would inherit that one CPU.  Its
		 * workers spawn on first use instead. */
		if (pinned_cpu() >= 0)
			spawn_once(fd, e, 0);
		return 0;
	}
	return real_listen(fd, backlog);
}

static int module_accept(int fd, struct fdent *e, struct sockaddr *addr, socklen_t *len, int flags)
{
	for (;;) {
		struct fsock_accept_args a;
		struct pollfd p[2];
		int r, n = 1, fl, lfd;

		memset(&a, 0, sizeof(a));
		a.fd = fd;
		a.flags = flags;
		a.addr = (uint64_t)(uintptr_t)addr;
		a.addrlen = (uint64_t)(uintptr_t)len;
		a.new_fd = -1;
		r = ioctl(g_devfd, FSOCK_IOC_ACCEPT, &a);
		if (r >= 0) {
			int nfd = a.new_fd >= 0 ? a.new_fd : r;
			track(nfd, F_FS);
			return nfd;
		}
		if (errno == ENOTTY || errno == ENOSYS)
			return real_accept4(fd, addr, len, flags);
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -1;
		fl = fcntl(fd, F_GETFL);
		if (fl < 0 || (fl & O_NONBLOCK)) {
			errno = EAGAIN;
			return -1;
		}
		/* Blocking listener: sleep until either queue has a connection, then retry
		 * (another worker may win the race; the ioctl then says EAGAIN again). */
		lfd = e->local_fd;
		p[0].fd = fd;
		p[0].events = POLLIN;
		if (lfd >= 0) {
			p[1].fd = lfd;
			p[1].events = POLLIN;
			n = 2;
		}
		/* A local queue kept inside the kernel is invisible to poll: re-check it. */
		if (poll(p, n, lfd >= 0 ? -1 : 20) < 0 && errno == EINTR)
			return -1;
	}
}

static int portable_accept(int fd, struct fdent *e, struct sockaddr *addr, socklen_t *len, int flags)
{
	int r, lfd = e->local_fd, fl;

	for (;;) {
		struct pollfd p[2];

		r = real_accept4(lfd, addr, len, flags);
		if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
			return r;
		fl = fcntl(fd, F_GETFL);
		if (fl < 0 || (fl & O_NONBLOCK))
			return real_accept4(fd, addr, len, flags);
		/* The application made the shared socket blocking after the split: wait on both. */
		p[0].fd = fd;
		p[0].events = POLLIN;
		p[1].fd = lfd;
		p[1].events = POLLIN;
		p[0].revents = p[1].revents = 0;
		if (poll(p, 2, -1) < 0)
			return -1;
		if (p[0].revents && !p[1].revents)
			return real_accept4(fd, addr, len, flags);
	}
}

static int do_accept(int fd, struct sockaddr *addr, socklen_t *len, int flags, int four)
{
	struct fdent *e;

	ensure();
	if (g_mode != MODE_PLAIN && (e = tracked(fd)) && (ent_flags(e) & F_LISTEN)) {
		spawn_once(fd, e, 0);
		if (ent_flags(e) & F_SPAWNED) {
			if (g_mode == MODE_MODULE)
				return module_accept(fd, e, addr, len, flags);
			if (e->owner == g_pid && e->local_fd >= 0)
				return portable_accept(fd, e, addr, len, flags);
		}
	}
	return four ? real_accept4(fd, addr, len, flags) : real_accept(fd, addr, len);
}

EXPORT int accept(int fd, struct sockaddr *addr, socklen_t *len)
{
	return do_accept(fd, addr, len, 0, 0);
}

EXPORT int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
	return do_accept(fd, addr, len, flags, 1);
}

EXPORT int close(int fd)
{
	struct fdent *e;
	uint32_t fl;

	ensure();
	if (fd >= 0 && fd == g_devfd)
		return 0; /* daemons closing "all" fds must not cut us off the module */
	e = tracked(fd);
	if (!e)
		return real_close(fd);
	fl = untrack(fd, e);
	if ((fl & F_FS) && g_mode == MODE_MODULE) {
		struct fsock_close_args c = { .fd = fd };

		if (ioctl(g_devfd, FSOCK_IOC_CLOSE, &c) == 0)
			return 0;
		if (errno == EBADF)
			return -1;
	}
	return real_close(fd);
}

EXPORT int shutdown(int fd, int how)
{
	struct fdent *e;
	uint32_t fl;

	ensure();
	e = tracked(fd);
	fl = ent_flags(e);
	if (fl & F_LISTEN) { /* stopping a listener stops its local one too */
		int lfd = e->local_fd;
		if (lfd >= 0 && e->owner == g_pid)
			real_shutdown(lfd, how);
	}
	if ((fl & F_FS) && g_mode == MODE_MODULE) {
		struct fsock_shutdown_args a = { .fd = fd, .how = how };

		if (ioctl(g_devfd, FSOCK_IOC_SHUTDOWN, &a) == 0)
			return 0;
		if (!not_supported(errno))
			return -1;
	}
	return real_shutdown(fd, how);
}

EXPORT pid_t fork(void)
{
	ensure();
	/* The child re-spawns its listeners lazily, when it first uses them: by then a
	 * worker has pinned itself, so the spawn happens for the right CPU. */
	return real_fork();
}

EXPORT int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
	struct fdent *e;
	int r, lfd, saved;

	ensure();
	r = real_epoll_ctl(epfd, op, fd, ev);
	if (g_mode == MODE_PLAIN || r != 0)
		return r;
	e = tracked(fd);
	if (!(ent_flags(e) & F_LISTEN))
		return r;
	if (op == EPOLL_CTL_ADD)
		spawn_once(fd, e, 1);
	lfd = e->local_fd;
	if (lfd < 0 || e->owner != g_pid)
		return r;
	/* Same event data: readiness of the local queue wakes the app for the listen fd. */
	saved = errno;
	if (op == EPOLL_CTL_ADD) {
		if (real_epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, ev) != 0 && errno == EEXIST)
			real_epoll_ctl(epfd, EPOLL_CTL_MOD, lfd, ev);
	} else if (op == EPOLL_CTL_MOD) {
		if (real_epoll_ctl(epfd, EPOLL_CTL_MOD, lfd, ev) != 0 && errno == ENOENT)
			real_epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, ev);
	} else if (op == EPOLL_CTL_DEL) {
		real_epoll_ctl(epfd, EPOLL_CTL_DEL, lfd, ev);
	}
	errno = saved;
	return r;
}

/* dup2/dup3 over a tracked fd closes it implicitly: drop our state first, and move our
 * device fd out of the way instead of losing it. */
static void before_dup_over(int newfd)
{
	struct fdent *e;

	if (newfd >= 0 && newfd == g_devfd) {
		int moved = fcntl(g_devfd, F_DUPFD_CLOEXEC, 3);
		if (moved >= 0)
			g_devfd = moved; /* the old number is closed by the dup itself */
	}
	e = tracked(newfd);
	if (e)
		untrack(newfd, e);
}

EXPORT int dup2(int oldfd, int newfd)
{
	ensure();
	if (oldfd != newfd)
		before_dup_over(newfd);
	return real_dup2(oldfd, newfd);
}

EXPORT int dup3(int oldfd, int newfd, int flags)
{
	ensure();
	if (oldfd != newfd)
		before_dup_over(newfd);
	return real_dup3(oldfd, newfd, flags);
}
