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
 * Only fds the library created or saw listening are tracked (a preallocated table of
 * atomic words indexed by fd; dup/F_DUPFD/dup2/dup3 copies share the entry's listener
 * state), so close/accept of anything else costs one table probe and the libc call.
 * close/accept/listen are lock-free and allocation-free (async-signal-safe); a blocking
 * accept honours SA_RESTART like the kernel's.  accept never changes the application's
 * O_NONBLOCK setting.
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
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#include "fastsocket_abi.h"

#ifdef fcntl64 /* musl spells it as a macro: we export both symbols */
#undef fcntl64
#endif

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
#define LOAD(p)     __atomic_load_n(p, __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n(p, v, __ATOMIC_RELEASE)
#define XCHG(p, v)  __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL)
#define CAS(p, o, n) __atomic_compare_exchange_n(p, o, n, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)

enum { MODE_PLAIN = 0, MODE_MODULE = 1, MODE_PORTABLE = 2 };

/*
 * Tracking state.  close, accept and listen are async-signal-safe in POSIX, and a signal
 * handler may call them while the interrupted thread is inside one of them: every path
 * reachable from them is lock-free and allocation-free.  All state lives in preallocated
 * arrays of atomics:
 *   g_fd[fd]   one word per fd: F_* flags | listener slot << LS_SHIFT (0 = untracked);
 *   g_ls[i]    per listening socket (shared by its dup'd fds): local listener, spawn owner,
 *              backlog, portable group page, and a reference count (fds + calls in flight)
 *              whose last holder releases the local listener.
 */
#define F_FS      1u  /* socket created by the module: close/shutdown via ioctl */
#define F_LISTEN  2u  /* listening socket we manage (has a listener slot) */
#define LS_SHIFT  8
#define LS_OF(w)  ((unsigned)((w) >> LS_SHIFT))
#define FD_MAX    (1 << 20) /* fds below 1M are tracked; larger ones stay plain */
#define LS_MAX    4096      /* listening sockets managed at once; more stay plain */

#define REF_FD    1         /* a tracked fd of the socket */
#define REF_USE   (1 << 16) /* a call using the slot right now */
#define REF_DEAD  (-1)      /* being set up or released */

struct lstate {
	int refs;           /* 0 = free */
	int local_fd;       /* local listener fd in process `owner`, or -1 */
	int spawned;        /* owner has a local listener (module: maybe without an fd) */
	pid_t owner;        /* process that made the spawn decision; 0 none, -pid deciding */
	pid_t spawner;      /* module mode: its thread that spawned (the module's local owner) */
	int backlog;
	struct pgroup *grp; /* portable mode: state shared by all forks of this listener */
};

static uint32_t g_fd[FD_MAX];         /* BSS: pages appear only where fds are tracked */
static struct lstate g_ls[LS_MAX + 1]; /* slot 0 means "none" */

/* Portable mode: one shared page per listener, inherited across fork, mirroring the
 * kernel's reuseport group so the CBPF program can map CPU -> socket index. */
#define MAXG 1000
struct pgroup {
	uint64_t lock;          /* pid << 32 | tid of the holder, 0 = free (see grp_lock) */
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
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static int (*real_fcntl64)(int, int, ...);

static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_ready;      /* atomic: init finished */
static int g_mode;       /* MODE_* */
static int g_devfd = -1; /* /dev/fastsocket in module mode (atomic: dup2 may move it) */
static int g_tracking;   /* atomic: some fd was ever tracked (skips probes otherwise) */
static pid_t g_pid;      /* cached getpid(), refreshed in the child after fork */
/* fork() waits for spawns in flight so that no child inherits a half-made local fd. */
static int g_spawning, g_forking; /* seq_cst */
static __thread int t_spawning __attribute__((tls_model("initial-exec")));

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
static int sys_fcntl(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	return (int)syscall(SYS_fcntl, fd, cmd, arg);
}
#define sys_fcntl64 sys_fcntl
static int sys_dup(int o) { return (int)syscall(SYS_fcntl, o, F_DUPFD, 0); }
static int sys_dup3(int o, int n, int f) { return (int)syscall(SYS_dup3, o, n, f); }
static int sys_dup2(int o, int n)
{
	if (o == n)
		return syscall(SYS_fcntl, o, F_GETFD) < 0 ? -1 : n;
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

/* ---- spawns vs fork ---- */
static int spawn_enter(void)
{
	__atomic_add_fetch(&g_spawning, 1, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&g_forking, __ATOMIC_SEQ_CST)) {
		__atomic_sub_fetch(&g_spawning, 1, __ATOMIC_SEQ_CST);
		return 0; /* the next use spawns */
	}
	t_spawning++;
	return 1;
}

static void spawn_exit(void)
{
	t_spawning--;
	__atomic_sub_fetch(&g_spawning, 1, __ATOMIC_SEQ_CST);
}

/* Spawns are a few syscalls long.  A fork from a handler that interrupted this thread's
 * own spawn does not wait for it (t_spawning). */
static void atfork_prepare(void)
{
	__atomic_add_fetch(&g_forking, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&g_spawning, __ATOMIC_SEQ_CST) > t_spawning)
		sched_yield();
}

static void atfork_parent(void) { __atomic_sub_fetch(&g_forking, 1, __ATOMIC_SEQ_CST); }

/* A child must not keep the parent's local listeners alive: a helper process that never
 * accepts would otherwise hold a queue the steering keeps feeding.  The child spawns its
 * own on first use (owner != its pid).  Calls in flight in other threads of the parent
 * did not come along: their references go. */
static void atfork_child(void)
{
	int i, r, lfd;

	g_pid = (pid_t)syscall(SYS_getpid);
	g_forking = 0;
	g_spawning = t_spawning;
	for (i = 1; i <= LS_MAX && g_tracking; i++) {
		struct lstate *l = &g_ls[i];

		r = l->refs;
		if (r == 0)
			continue;
		r = r < 0 ? 0 : r & (REF_USE - 1);
		lfd = l->local_fd;
		l->local_fd = -1;
		l->spawned = 0;
		if (lfd >= 0)
			sys_close(lfd);
		if (r == 0 && l->grp) {
			munmap(l->grp, sizeof(*l->grp));
			l->grp = NULL;
		}
		l->refs = r;
	}
}

static int query_version(struct fsock_version *v)
{
	memset(v, 0, sizeof(*v));
	return ioctl(LOAD(&g_devfd), FSOCK_IOC_VERSION, v);
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
	RESOLVE(dup);
	RESOLVE(dup2);
	RESOLVE(dup3);
	RESOLVE(fcntl);
	RESOLVE(fcntl64);
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
static uint32_t *fd_word(int fd)
{
	return fd >= 0 && fd < FD_MAX ? &g_fd[fd] : NULL;
}

static uint32_t fd_load(int fd)
{
	uint32_t *p = fd_word(fd);

	return p && LOAD(&g_tracking) ? LOAD(p) : 0;
}

/* Take fd's word (its references come along); untracked fds cost one load. */
static uint32_t fd_take(int fd)
{
	uint32_t *p = fd_word(fd);

	return p && LOAD(&g_tracking) && LOAD(p) ? XCHG(p, 0) : 0;
}

static int ls_put(unsigned i, int unit, int fd);

/* Publish `w` (owning one fd reference of its slot) for fd; a word left behind by a
 * close we did not see (close_range, raw syscalls) is released. */
static void fd_track(int fd, uint32_t w)
{
	uint32_t *p = fd_word(fd), old;

	if (!p) {
		if (LS_OF(w))
			ls_put(LS_OF(w), REF_FD, -1);
		return;
	}
	if (w)
		STORE(&g_tracking, 1);
	old = XCHG(p, w);
	if (LS_OF(old))
		ls_put(LS_OF(old), REF_FD, -1);
}

/* A free listener slot with one fd reference, or 0 when all are taken. */
static unsigned ls_new(int backlog, struct pgroup *g)
{
	unsigned i;

	for (i = 1; i <= LS_MAX; i++) {
		struct lstate *l = &g_ls[i];
		int zero = 0;

		if (LOAD(&l->refs) != 0 || !CAS(&l->refs, &zero, REF_DEAD))
			continue;
		STORE(&l->local_fd, -1);
		STORE(&l->spawned, 0);
		STORE(&l->owner, 0);
		STORE(&l->spawner, 0);
		STORE(&l->backlog, backlog);
		STORE(&l->grp, g);
		STORE(&l->refs, REF_FD);
		return i;
	}
	return 0;
}

static int ls_get(unsigned i, int unit)
{
	int r = LOAD(&g_ls[i].refs);

	while (r > 0)
		if (CAS(&g_ls[i].refs, &r, r + unit))
			return 1;
	return 0;
}

/* The listener slot of fd with a use reference (drop it with ls_put(i, REF_USE, -1)). */
static unsigned ls_use(int fd)
{
	uint32_t w = fd_load(fd);
	unsigned i = LS_OF(w);

	if (!i || !(w & F_LISTEN) || !ls_get(i, REF_USE))
		return 0;
	if (LS_OF(fd_load(fd)) != i) { /* closed (and maybe reused) meanwhile */
		ls_put(i, REF_USE, -1);
		return 0;
	}
	return i;
}

static void ls_release(struct lstate *l, int fd);

/* Drop a reference; the last one releases the slot.  fd: an fd of the listening socket
 * that is still open, or -1.  Returns 1 when this call released it. */
static int ls_put(unsigned i, int unit, int fd)
{
	struct lstate *l = &g_ls[i];
	int r = LOAD(&l->refs);

	for (;;) {
		if (r < unit)
			return 0; /* a reference that stayed in the parent (fork from a handler) */
		if (r != unit) {
			if (CAS(&l->refs, &r, r - unit))
				return 0;
		} else if (CAS(&l->refs, &r, REF_DEAD)) {
			break;
		}
	}
	ls_release(l, fd);
	STORE(&l->refs, 0);
	return 1;
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

static pid_t gettid_now(void) { return (pid_t)syscall(SYS_gettid); }

/* The local listener fd of slot l that this thread may wait on, or -1.  In module mode
 * only the spawning thread: ACCEPT drains a local from its CPU and, on the reuseport
 * backend, from the spawning process; where it cannot (a thread elsewhere on a module
 * whose locals are the spawning thread's), a thread woken by the local would get EAGAIN
 * with the local still readable, and spin.  Other threads wait on the listen fd, whose
 * poll includes every local ACCEPT would give them. */
static int local_to_wait_on(struct lstate *l)
{
	int lfd = LOAD(&l->local_fd);

	if (lfd < 0 || LOAD(&l->owner) != g_pid)
		return -1;
	if (g_mode == MODE_MODULE && LOAD(&l->spawner) != gettid_now())
		return -1;
	return lfd;
}

static int not_supported(int err)
{
	return err == ENOTTY || err == ENOSYS || err == EOPNOTSUPP || err == EINVAL;
}

/* ---- portable mode: reuseport group mirror ---- */
/* A spin lock, not a pthread mutex: its holders never block (no cancellation point, no
 * allocation), a handler can take another group's lock while its thread holds one, and a
 * holder that died (any process of the group) is detected by its pid.  Returns -1 when
 * this very thread holds it (a handler interrupted it), or when another thread of this
 * process keeps it far longer than any critical section (two handlers each waiting for
 * the lock their own thread holds): the caller goes without (stale mirror, no hang). */
#define GRP_SPIN_MAX 200000
static int grp_lock(struct pgroup *g)
{
	uint64_t me = (uint64_t)(uint32_t)g_pid << 32 | (uint32_t)syscall(SYS_gettid), cur;
	int saved = errno, r = 0, spins = 0;

	for (;;) {
		cur = 0;
		if (CAS(&g->lock, &cur, me))
			break;
		if (cur == me || ((pid_t)(cur >> 32) == g_pid && ++spins > GRP_SPIN_MAX)) {
			r = -1;
			break;
		}
		if (kill((pid_t)(cur >> 32), 0) != 0 && errno == ESRCH) {
			if (CAS(&g->lock, &cur, me))
				break; /* the mirror is still consistent: holders write it last */
			continue;
		}
		sched_yield();
	}
	errno = saved;
	return r;
}

static void grp_unlock(struct pgroup *g) { STORE(&g->lock, 0); }

static struct pgroup *grp_new(void)
{
	struct pgroup *g = mmap(NULL, sizeof(*g), PROT_READ | PROT_WRITE,
				MAP_SHARED | MAP_ANONYMOUS, -1, 0);

	if (g == MAP_FAILED)
		return NULL;
	g->nsocks = 1; /* the application's socket: first member of the group */
	g->cpu_of[0] = -1;
	return g;
}

/* CPU -> group index as a jump list: `ld cpu; jeq #c,ret #i ...; ret #~0`.
 * An index beyond the group makes the kernel fall back to its hash.  Sized to the group:
 * this may run on a small signal stack. */
static void grp_attach(int s, struct pgroup *g)
{
	struct fs_filter f[2 + 2 * g->nsocks];
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

/* SO_REUSEPORT stays on the application's socket only while the group has locals: then a
 * second server gets EADDRINUSE again and nobody else can join.  Group lock held. */
static void grp_unshare(struct pgroup *g, int fd)
{
	int zero = 0;

	if (g->nsocks <= 1 && fd >= 0)
		setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &zero, sizeof(zero));
}

/* The kernel fills a removed slot with the last member; mirror that, and re-attach the
 * program through our socket before it leaves (the program belongs to the group).
 * fd: the application's socket if still open here, else -1. */
static void grp_leave(struct pgroup *g, int s, int fd)
{
	int i, last;

	if (grp_lock(g)) {
		sys_close(s);
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
	sys_close(s); /* leaves the kernel group while we hold the lock */
	grp_unshare(g, fd);
	grp_unlock(g);
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
static void portable_spawn(int fd, struct lstate *l)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	struct pgroup *g = LOAD(&l->grp);
	int one = 1, cpu, fl, s, ok;
	char dev[64];
	socklen_t dl = sizeof(dev);

	cpu = pinned_cpu();
	fl = real_fcntl(fd, F_GETFL);
	/* Blocking accept() on the shared socket could sleep while our own queue fills,
	 * so only non-blocking (event-driven) listeners are split. */
	if (!g || cpu < 0 || cpu >= 65536 || fl < 0 || !(fl & O_NONBLOCK))
		return;
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0)
		return;
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
		sys_close(s);
		return;
	}
	/* SO_REUSEPORT goes on the application's socket under the lock, only when a local
	 * really joins (kernel < 3.9: setsockopt fails). */
	ok = g->nsocks < MAXG && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) == 0 &&
	     real_bind(s, (struct sockaddr *)&ss, sl) == 0 && real_listen(s, LOAD(&l->backlog)) == 0;
	if (!ok) {
		grp_unshare(g, fd);
		grp_unlock(g);
		sys_close(s);
		return;
	}
	g->cpu_of[g->nsocks] = cpu;
	g->pid_of[g->nsocks] = g_pid;
	g->nsocks++;
	grp_attach(s, g);
	grp_unlock(g);
	STORE(&l->local_fd, s);
	STORE(&l->spawned, 1);
}

/* ---- module mode ---- */
static int query_version(struct fsock_version *v);

static void module_spawn(int fd, struct lstate *l)
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
	if (ioctl(LOAD(&g_devfd), FSOCK_IOC_SPAWN, &a) != 0)
		return;
	STORE(&l->spawner, gettid_now());
	STORE(&l->local_fd, a.local_fd);
	STORE(&l->spawned, 1);
}

/* Spawn decision, once per listener and process: a forked child drops its copy of the
 * parent's local listener and spawns for the CPU it runs on.  The decision is claimed
 * with a CAS on `owner`: a concurrent caller (another thread, a handler) goes on
 * without the local this once.  Caller holds a use reference on slot i. */
static void spawn_once(int fd, unsigned i, int from_epoll)
{
	struct lstate *l = &g_ls[i];
	pid_t o = LOAD(&l->owner);
	int old, saved = errno;

	if (o == g_pid || o == -g_pid)
		return;
	/* Portable local sockets are only visible to epoll users: a poll()/accept() loop
	 * would never look at them, so only epoll_ctl may create one. */
	if (g_mode == MODE_PORTABLE && !from_epoll)
		return;
	if (!spawn_enter())
		return;
	if (CAS(&l->owner, &o, -g_pid)) {
		old = XCHG(&l->local_fd, -1);
		if (old >= 0)
			sys_close(old); /* inherited copy; the parent keeps its own */
		STORE(&l->spawned, 0);
		if (g_mode == MODE_MODULE)
			module_spawn(fd, l);
		else
			portable_spawn(fd, l);
		STORE(&l->owner, g_pid);
	}
	spawn_exit();
	errno = saved;
}

/* Last reference of a listening socket gone: release its local listener. */
static void ls_release(struct lstate *l, int fd)
{
	int lfd = XCHG(&l->local_fd, -1), saved = errno;
	pid_t owner = LOAD(&l->owner);
	struct pgroup *g = XCHG(&l->grp, NULL);

	STORE(&l->spawned, 0);
	if (lfd >= 0) {
		if (owner != g_pid) {
			sys_close(lfd);
		} else if (g_mode == MODE_MODULE) {
			struct fsock_close_args c = { .fd = lfd };
			if (ioctl(LOAD(&g_devfd), FSOCK_IOC_CLOSE, &c) != 0 && errno != EBADF)
				sys_close(lfd);
		} else if (g) {
			grp_leave(g, lfd, fd);
		} else {
			sys_close(lfd);
		}
	}
	if (g)
		munmap(g, sizeof(*g));
	errno = saved;
}

static int is_inet_stream(int domain, int type)
{
	return (domain == AF_INET || domain == AF_INET6) && (type & 0xf) == SOCK_STREAM;
}

/*
 * Sleep until one of p[0..n-1] is readable (p has room for one more entry).  Returns 0
 * to retry the accept, -1 with errno EINTR when a handler without SA_RESTART ran: what
 * the kernel's blocking accept does.  poll() itself never restarts, so when handlers of
 * both kinds are installed, the SA_RESTART signals are blocked during the wait and
 * watched with a signalfd: one arriving ends the wait, its handler runs when ppoll
 * restores the mask, and the accept is retried.
 */
static int wait_readable(struct pollfd *p, int n, int timeout_ms)
{
	struct timespec ts = { timeout_ms / 1000, (timeout_ms % 1000) * 1000000L };
	sigset_t cur, restart, mask;
	int sig, r, err, sfd = -1, other = 0;

	sigemptyset(&restart);
	pthread_sigmask(SIG_SETMASK, NULL, &cur);
	for (sig = 1; sig < NSIG; sig++) {
		struct sigaction sa;

		if (sigismember(&cur, sig) == 1 || sigaction(sig, NULL, &sa) != 0 ||
		    sa.sa_handler == SIG_DFL || sa.sa_handler == SIG_IGN)
			continue;
		if (sa.sa_flags & SA_RESTART)
			sigaddset(&restart, sig);
		else
			other = 1;
	}
	if (other && !sigisemptyset(&restart))
		sfd = signalfd(-1, &restart, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sfd >= 0) {
		p[n].fd = sfd;
		p[n].events = POLLIN;
		p[n].revents = 0;
		sigorset(&mask, &cur, &restart);
	}
	r = ppoll(p, (nfds_t)(n + (sfd >= 0)), timeout_ms < 0 ? NULL : &ts, sfd >= 0 ? &mask : NULL);
	err = errno;
	if (sfd >= 0)
		sys_close(sfd);
	if (r >= 0 || (err == EINTR && !other))
		return 0;
	errno = err; /* EINTR: a handler without SA_RESTART (or one we cannot tell apart) */
	return -1;
}

/* ---- interposers ---- */
EXPORT int socket(int domain, int type, int protocol)
{
	ensure();
	if (g_mode == MODE_MODULE && is_inet_stream(domain, type)) {
		struct fsock_socket_args a = { .family = domain, .type = type, .protocol = protocol, .fd = -1 };
		int r = ioctl(LOAD(&g_devfd), FSOCK_IOC_SOCKET, &a);
		int fd = a.fd >= 0 ? a.fd : r;

		if (r >= 0 && fd >= 0) {
			fd_track(fd, F_FS);
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
	struct pgroup *g;
	uint32_t w;
	unsigned i;

	if (r != 0)
		return r;
	w = fd_load(fd);
	if (LS_OF(w)) { /* listen() again: new backlog for locals spawned from now on */
		STORE(&g_ls[LS_OF(w)].backlog, backlog);
		return r;
	}
	if (getsockname(fd, (struct sockaddr *)&ss, &sl) != 0 ||
	    (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) ||
	    getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &tl) != 0 || type != SOCK_STREAM)
		return r;
	/* Applications doing their own SO_REUSEPORT keep full control of their group. */
	if (getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &v, &vl) == 0 && v)
		return r;
	g = grp_new();
	if (!g)
		return r;
	i = ls_new(backlog, g);
	if (!i) {
		munmap(g, sizeof(*g));
		return r;
	}
	fd_track(fd, w | F_LISTEN | i << LS_SHIFT);
	return r;
}

EXPORT int listen(int fd, int backlog)
{
	uint32_t w;
	unsigned i;

	ensure();
	if (g_mode == MODE_PORTABLE)
		return portable_listen(fd, backlog);
	w = g_mode == MODE_MODULE ? fd_load(fd) : 0;
	if (w & F_FS) {
		struct fsock_listen_args a = { .fd = fd, .backlog = backlog };

		if (ioctl(LOAD(&g_devfd), FSOCK_IOC_LISTEN, &a) != 0) {
			if (!not_supported(errno))
				return -1;
			if (real_listen(fd, backlog) != 0)
				return -1;
		}
		i = LS_OF(w);
		if (i)
			STORE(&g_ls[i].backlog, backlog);
		else if ((i = ls_new(backlog, NULL)))
			fd_track(fd, w | F_LISTEN | i << LS_SHIFT);
		/* An unpinned caller is usually a master about to fork workers: spawning now
		 * would (in mode 2) pin it, and every worker would inherit that one CPU.  Its
		 * workers spawn on first use instead. */
		if (i && pinned_cpu() >= 0 && (i = ls_use(fd))) {
			spawn_once(fd, i, 0);
			ls_put(i, REF_USE, -1);
		}
		return 0;
	}
	return real_listen(fd, backlog);
}

static int module_accept(int fd, struct lstate *l, struct sockaddr *addr, socklen_t *len, int flags)
{
	for (;;) {
		struct fsock_accept_args a;
		struct pollfd p[3];
		int r, n = 1, fl, lfd;

		memset(&a, 0, sizeof(a));
		a.fd = fd;
		a.flags = flags;
		a.addr = (uint64_t)(uintptr_t)addr;
		a.addrlen = (uint64_t)(uintptr_t)len;
		a.new_fd = -1;
		r = ioctl(LOAD(&g_devfd), FSOCK_IOC_ACCEPT, &a);
		if (r >= 0) {
			int nfd = a.new_fd >= 0 ? a.new_fd : r;
			fd_track(nfd, F_FS);
			return nfd;
		}
		if (errno == ENOTTY || errno == ENOSYS || errno == EOPNOTSUPP) /* a kind it refuses */
			return real_accept4(fd, addr, len, flags);
		if (errno != EAGAIN && errno != EWOULDBLOCK)
			return -1;
		fl = real_fcntl(fd, F_GETFL);
		if (fl < 0 || (fl & O_NONBLOCK)) {
			errno = EAGAIN;
			return -1;
		}
		/* Blocking listener: sleep until either queue has a connection, then retry
		 * (another worker may win the race; the ioctl then says EAGAIN again). */
		lfd = local_to_wait_on(l);
		p[0] = (struct pollfd){ .fd = fd, .events = POLLIN };
		if (lfd >= 0)
			p[n++] = (struct pollfd){ .fd = lfd, .events = POLLIN };
		/* A local queue kept inside the kernel is invisible to poll: re-check it. */
		if (wait_readable(p, n, lfd >= 0 ? -1 : 20) != 0)
			return -1;
	}
}

static int portable_accept(int fd, struct lstate *l, struct sockaddr *addr, socklen_t *len, int flags)
{
	int r, lfd = LOAD(&l->local_fd), fl;

	for (;;) {
		struct pollfd p[3];

		r = real_accept4(lfd, addr, len, flags);
		if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
			return r;
		fl = real_fcntl(fd, F_GETFL);
		if (fl < 0 || (fl & O_NONBLOCK))
			return real_accept4(fd, addr, len, flags);
		/* The application made the shared socket blocking after the split: wait on both. */
		p[0] = (struct pollfd){ .fd = fd, .events = POLLIN };
		p[1] = (struct pollfd){ .fd = lfd, .events = POLLIN };
		if (wait_readable(p, 2, -1) != 0)
			return -1;
		if (p[0].revents && !p[1].revents)
			return real_accept4(fd, addr, len, flags);
	}
}

static int do_accept(int fd, struct sockaddr *addr, socklen_t *len, int flags, int four)
{
	unsigned i;

	ensure();
	if (g_mode != MODE_PLAIN && (i = ls_use(fd))) {
		struct lstate *l = &g_ls[i];
		int r = 0, mine, err;

		spawn_once(fd, i, 0);
		mine = LOAD(&l->spawned) && LOAD(&l->owner) == g_pid;
		if (mine && g_mode == MODE_MODULE)
			r = module_accept(fd, l, addr, len, flags);
		else if (mine && LOAD(&l->local_fd) >= 0)
			r = portable_accept(fd, l, addr, len, flags);
		else
			mine = 0;
		err = errno;
		ls_put(i, REF_USE, -1);
		errno = err;
		if (mine)
			return r;
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

static int do_close(int fd)
{
	uint32_t w;
	int last = 1;

	if (fd >= 0 && fd == LOAD(&g_devfd))
		return 0; /* daemons closing "all" fds must not cut us off the module */
	w = fd_take(fd);
	if (!w)
		return real_close(fd);
	if (LS_OF(w)) /* other fds (dup) may still share the socket and its local */
		last = ls_put(LS_OF(w), REF_FD, fd);
	if ((w & F_FS) && last && g_mode == MODE_MODULE) {
		struct fsock_close_args c = { .fd = fd };

		if (ioctl(LOAD(&g_devfd), FSOCK_IOC_CLOSE, &c) == 0)
			return 0;
		if (errno == EBADF)
			return -1;
	}
	return real_close(fd);
}

EXPORT int close(int fd)
{
	ensure();
	return do_close(fd);
}

/* ---- close_range / closefrom: "close everything from N" (daemons, before exec) ----
 * The kernel would close our own fds too (the device, local listeners: later calls
 * would reach whatever file reuses their numbers) and leave the tracking of the app's
 * sockets stale.  Tracked fds in the range go through close(), ours are skipped, the
 * rest is one close_range per gap between ours. */
#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef CLOSE_RANGE_UNSHARE
#define CLOSE_RANGE_UNSHARE (1U << 1)
#endif
#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

/* The lowest of our own fds (the device, this process's local listeners) in [lo, hi]. */
static int next_ours(unsigned lo, unsigned hi)
{
	int best = -1, fd = LOAD(&g_devfd), i;

	if (fd >= 0 && (unsigned)fd >= lo && (unsigned)fd <= hi)
		best = fd;
	for (i = 1; i <= LS_MAX && LOAD(&g_tracking); i++) {
		fd = LOAD(&g_ls[i].local_fd);
		if (fd >= 0 && (unsigned)fd >= lo && (unsigned)fd <= hi && (best < 0 || fd < best) &&
		    LOAD(&g_ls[i].owner) == g_pid)
			best = fd;
	}
	return best;
}

static void close_tracked(unsigned lo, unsigned hi)
{
	unsigned fd;

	for (fd = lo; fd < FD_MAX && fd <= hi && LOAD(&g_tracking); fd++)
		if (fd_load((int)fd))
			do_close((int)fd);
}

EXPORT int close_range(unsigned first, unsigned last, int flags)
{
	int k;

	ensure();
	/* Bad arguments, marking close-on-exec only, or a kernel without it: as it says. */
	if (first > last || (flags & ~(int)(CLOSE_RANGE_UNSHARE | CLOSE_RANGE_CLOEXEC)) ||
	    (flags & CLOSE_RANGE_CLOEXEC) || syscall(SYS_close_range, ~0U, ~0U, 0) != 0)
		return (int)syscall(SYS_close_range, first, last, flags);
	/* UNSHARE: the closes happen in a private copy of the table (a child about to exec);
	 * the process's sockets stay open in the others' and keep their tracking. */
	if (!(flags & CLOSE_RANGE_UNSHARE))
		close_tracked(first, last);
	for (;;) {
		k = next_ours(first, last);
		if (k < 0)
			return (int)syscall(SYS_close_range, first, last, flags);
		if ((unsigned)k > first && syscall(SYS_close_range, first, (unsigned)k - 1, flags) != 0)
			return -1;
		if ((unsigned)k == last)
			return 0;
		first = (unsigned)k + 1;
	}
}

/* glibc >= 2.34 (its own closefrom calls the kernel directly).  Kernels before 5.9 have
 * no close_range: the fds open are listed from /proc/self/fd, as glibc does. */
struct fs_dirent64 {
	uint64_t ino;
	int64_t off;
	unsigned short reclen;
	unsigned char type;
	char name[];
};

static void close_listed(int lowfd)
{
	char buf[4096];
	int dir = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int closed, fd;
	long n, off;

	if (dir < 0)
		return;
	do { /* closing while reading the directory may skip entries: until a pass closes none */
		closed = 0;
		lseek(dir, 0, SEEK_SET);
		while ((n = syscall(SYS_getdents64, dir, buf, sizeof(buf))) > 0) {
			for (off = 0; off < n; off += ((struct fs_dirent64 *)(buf + off))->reclen) {
				const char *c = ((struct fs_dirent64 *)(buf + off))->name;

				for (fd = 0; *c >= '0' && *c <= '9' && fd < (1 << 24); c++)
					fd = fd * 10 + (*c - '0');
				if (*c || fd < lowfd || fd == dir || next_ours((unsigned)fd, (unsigned)fd) == fd)
					continue;
				do_close(fd);
				closed++;
			}
		}
	} while (closed);
	sys_close(dir);
}

EXPORT void closefrom(int lowfd)
{
	int saved = errno;

	ensure();
	if (lowfd < 0)
		lowfd = 0;
	if (close_range((unsigned)lowfd, ~0U, 0) != 0)
		close_listed(lowfd); /* without /proc either, nothing is closed (glibc aborts) */
	errno = saved;
}

EXPORT int shutdown(int fd, int how)
{
	uint32_t w;
	unsigned i;

	ensure();
	w = fd_load(fd);
	if ((w & F_LISTEN) && (i = ls_use(fd))) { /* stopping a listener stops its local one too */
		int lfd = LOAD(&g_ls[i].local_fd);

		if (lfd >= 0 && LOAD(&g_ls[i].owner) == g_pid)
			real_shutdown(lfd, how);
		ls_put(i, REF_USE, -1);
	}
	if ((w & F_FS) && g_mode == MODE_MODULE) {
		struct fsock_shutdown_args a = { .fd = fd, .how = how };

		if (ioctl(LOAD(&g_devfd), FSOCK_IOC_SHUTDOWN, &a) == 0)
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
	unsigned i;
	int r, lfd, saved, waits;

	ensure();
	r = real_epoll_ctl(epfd, op, fd, ev);
	if (g_mode == MODE_PLAIN || r != 0 || !(i = ls_use(fd)))
		return r;
	saved = errno;
	if (op == EPOLL_CTL_ADD)
		spawn_once(fd, i, 1);
	lfd = LOAD(&g_ls[i].owner) == g_pid ? LOAD(&g_ls[i].local_fd) : -1;
	waits = local_to_wait_on(&g_ls[i]) >= 0;
	/* Same event data: readiness of the local queue wakes the app for the listen fd.
	 * Only a thread that may wait on the local adds it; any thread changes or drops it. */
	if (lfd >= 0) {
		if (op == EPOLL_CTL_ADD && waits) {
			if (real_epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, ev) != 0 && errno == EEXIST)
				real_epoll_ctl(epfd, EPOLL_CTL_MOD, lfd, ev);
		} else if (op == EPOLL_CTL_MOD) {
			if (real_epoll_ctl(epfd, EPOLL_CTL_MOD, lfd, ev) != 0 && errno == ENOENT && waits)
				real_epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, ev);
		} else if (op == EPOLL_CTL_DEL) {
			real_epoll_ctl(epfd, EPOLL_CTL_DEL, lfd, ev);
		}
	}
	ls_put(i, REF_USE, -1);
	errno = saved;
	return r;
}

/* ---- dup family: a copy shares the socket, so it shares its tracking ---- */
static void dup_track(int oldfd, int newfd)
{
	uint32_t w = fd_load(oldfd);
	unsigned i = LS_OF(w);
	int saved = errno;

	if (newfd < 0 || newfd == oldfd || !w)
		return;
	if (i && !ls_get(i, REF_FD))
		w &= F_FS; /* oldfd was closed meanwhile */
	fd_track(newfd, w);
	errno = saved;
}

/* dup2/dup3 over a tracked fd closes it implicitly: drop our state first (while the
 * socket is still open here), and move our device fd out of the way instead of losing
 * it.  A bad oldfd changes nothing. */
static int dup_over(int oldfd, int newfd, int flags, int three)
{
	uint32_t w;
	int r;

	ensure();
	if (three && (flags & ~O_CLOEXEC)) { /* what dup3 refuses changes nothing here either */
		errno = EINVAL;
		return -1;
	}
	if (oldfd != newfd && real_fcntl(oldfd, F_GETFD) >= 0) {
		if (newfd >= 0 && newfd == LOAD(&g_devfd)) {
			int moved = real_fcntl(newfd, F_DUPFD_CLOEXEC, 3);
			if (moved >= 0)
				STORE(&g_devfd, moved); /* the old number is closed by the dup itself */
		}
		w = fd_take(newfd);
		if (LS_OF(w))
			ls_put(LS_OF(w), REF_FD, newfd);
	}
	r = three ? real_dup3(oldfd, newfd, flags) : real_dup2(oldfd, newfd);
	if (r >= 0)
		dup_track(oldfd, r);
	return r;
}

EXPORT int dup(int oldfd)
{
	int r;

	ensure();
	r = real_dup(oldfd);
	if (r >= 0)
		dup_track(oldfd, r);
	return r;
}

EXPORT int dup2(int oldfd, int newfd) { return dup_over(oldfd, newfd, 0, 0); }

EXPORT int dup3(int oldfd, int newfd, int flags) { return dup_over(oldfd, newfd, flags, 1); }

/* fcntl's third argument is an int or a pointer: passed on as a pointer-sized word, as
 * libc's own fcntl reads it. */
static int do_fcntl(int (*fn)(int, int, ...), int fd, int cmd, void *arg)
{
	int r = fn(fd, cmd, arg);

	if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC))
		dup_track(fd, r);
	return r;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (!LOAD(&g_ready)) /* another library's constructor, before ours: nothing tracked */
		return sys_fcntl(fd, cmd, arg);
	return do_fcntl(real_fcntl, fd, cmd, arg);
}

/* glibc's fcntl with _FILE_OFFSET_BITS=64 (Python, nginx) */
EXPORT int fcntl64(int fd, int cmd, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, cmd);
	arg = va_arg(ap, void *);
	va_end(ap);
	if (!LOAD(&g_ready))
		return sys_fcntl(fd, cmd, arg);
	return do_fcntl(real_fcntl64, fd, cmd, arg);
}
