/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Fastsocket module internals: the contract between the core (fastsocket_main.c:
 * parameters, /dev/fastsocket, /proc/net/fastsocket) and one backend.
 *
 * Exactly one backend is linked into fastsocket.ko, chosen by Kbuild:
 *   backend_el6.c        kernel carries the Fastsocket patches (include/net/fastsocket.h):
 *                        per-CPU listen tables, fast epoll, RFD live in the kernel.
 *   backend_reuseport.c  unpatched kernel >= 5.9: local listen sockets are SO_REUSEPORT
 *                        siblings of the global one, steered per CPU by a reuseport cBPF.
 * The backend defines `const struct fsock_backend fsock_backend`.
 *
 * Calling context of every op: process context of the ioctl caller (may sleep), the core
 * has already copied the ioctl argument from user space and validated numbers (cpu is
 * -1 or a possible, online CPU; flags only SOCK_NONBLOCK|SOCK_CLOEXEC). Ops return
 * >= 0 or -errno. No op is called before init() succeeded or after exit() started.
 * Module lifetime: the core's misc device has .owner = THIS_MODULE, so the module cannot
 * be unloaded while a process has /dev/fastsocket open; a backend that leaves its own code
 * reachable from a socket (e.g. proto_ops copies) must hold a module reference per such
 * socket (proto_ops.owner = THIS_MODULE does that through the socket layer).
 */
#ifndef FASTSOCKET_INTERNAL_H
#define FASTSOCKET_INTERNAL_H

#include <linux/version.h>
#include <linux/types.h>
#include <linux/kernel.h>
#include <linux/percpu.h>
#include <linux/smp.h>
#include <linux/socket.h>
#include "fastsocket_abi.h"

#define FSOCK_NAME "fastsocket"

struct file;
struct socket;

/* Run-time switches (module parameters), indices for set_param/get_param. */
enum fsock_param {
	FSOCK_PARAM_LISTEN_SPAWN = 0,	/* 0 off, 1 app pins workers, 2 module pins */
	FSOCK_PARAM_FAST_EPOLL,		/* 0/1 */
	FSOCK_PARAM_RFD,		/* 0/1 receive flow deliver */
	FSOCK_PARAM_NR
};

/* Feature bit (FSOCK_FEAT_*) a parameter controls. */
static inline __u32 fsock_param_feature(enum fsock_param p)
{
	static const __u32 bits[FSOCK_PARAM_NR] = {
		FSOCK_FEAT_LISTEN_SPAWN, FSOCK_FEAT_FAST_EPOLL, FSOCK_FEAT_RFD,
	};
	return bits[p];
}

/* Per-CPU counters shown in /proc/net/fastsocket, in this column order. */
enum fsock_stat {
	FSOCK_STAT_LOCAL_LOOKUP = 0,	/* listener lookups / accept probes hitting the local socket */
	FSOCK_STAT_GLOBAL_LOOKUP,	/* ... on the global socket */
	FSOCK_STAT_LOCAL_ACCEPT,	/* connections accepted from the CPU's local socket */
	FSOCK_STAT_GLOBAL_ACCEPT,	/* connections accepted from the global socket */
	FSOCK_STAT_STEERED,		/* connections/packets steered to the CPU that owns them */
	FSOCK_STAT_NR
};

struct fsock_stats {
	unsigned long v[FSOCK_STAT_NR];
};

DECLARE_PER_CPU(struct fsock_stats, fsock_stats);

/* Count on the current CPU (any context). get_cpu() instead of this_cpu_inc() because
 * 2.6.32 has no this_cpu ops; a rare lost update against softirq is fine for statistics.
 */
static inline void fsock_stat_inc(enum fsock_stat s)
{
	int cpu = get_cpu();

	per_cpu(fsock_stats, cpu).v[s]++;
	put_cpu();
}

static inline void fsock_stat_inc_cpu(int cpu, enum fsock_stat s)
{
	per_cpu(fsock_stats, cpu).v[s]++;	/* racy by design: statistics only */
}

struct fsock_backend {
	const char *name;
	/* FSOCK_FEAT_* the backend can provide at all (KERNEL_HOOKS, REUSEPORT, ...). The
	 * core reports feature bits of switchable features only while their parameter is on.
	 */
	__u32 features;

	int (*init)(void);
	void (*exit)(void);

	/* Drive the kernel's switch for a parameter (only called when the backend has the
	 * feature). Called at init for every parameter and on every write to
	 * /sys/module/fastsocket/parameters/<p>. Optional.
	 */
	int (*set_param)(enum fsock_param p, int val);
	/* Current value of the kernel's switch, so sysfs never shows a stale copy when the
	 * kernel switch can also be changed elsewhere (sysctl). Optional; <0: use the core's.
	 */
	int (*get_param)(enum fsock_param p);

	/* FSOCK_IOC_SOCKET: a new socket installed as an fd in the caller; returns the fd. */
	int (*socket)(int family, int type, int protocol);
	/* FSOCK_IOC_LISTEN on any socket fd of the caller (not only ones from ->socket). */
	int (*listen)(int fd, int backlog);
	/* FSOCK_IOC_SPAWN: create (or find) the local listen socket of global listen socket
	 * `fd` for `cpu` (resolved by the core: never -1 here; in mode 2 the core has already
	 * pinned the caller to `cpu` and undoes that if spawn fails). *local: a new reference
	 * to the local socket's file, NOT installed: the core installs it as the caller's fd
	 * only once nothing can fail any more (else fput()s it); NULL when the local socket
	 * stays inside the kernel (el6 per-CPU tables). Only called when enable_listen_spawn
	 * != 0.
	 */
	int (*spawn)(int fd, int cpu, struct file **local);
	/* FSOCK_IOC_SPAWN_ALL: after fork, spawn for the caller's CPU every global listen
	 * socket the caller has an fd for. Returns the number spawned. Optional.
	 */
	int (*spawn_all)(int cpu);
	/* FSOCK_IOC_ACCEPT: never blocks. Try the local socket of `cpu` (the caller's CPU),
	 * then the global one; -EAGAIN when both are empty. Returns the new fd; fills the
	 * peer address like accept4(2). `flags`: SOCK_NONBLOCK|SOCK_CLOEXEC for the new fd.
	 */
	int (*accept)(int fd, int cpu, int flags, struct sockaddr __user *addr,
		      int __user *addrlen);
	/* FSOCK_IOC_CLOSE / FSOCK_IOC_SHUTDOWN. */
	int (*close)(int fd);
	int (*shutdown)(int fd, int how);

	/* Add kernel-side counters of `cpu` (el6: the kernel counts lookups itself) to
	 * `out`, which already holds the module's own per-CPU counts. Optional.
	 */
	void (*read_stats)(int cpu, struct fsock_stats *out);
};

extern const struct fsock_backend fsock_backend;

/* Core services for backends. */
int fsock_param(enum fsock_param p);	/* current value of a parameter */

/*
 * The LSM checks the syscalls run (security_socket_listen/accept/shutdown/bind). An ioctl
 * must pass the same checks as the syscall it stands for. When the kernel has socket LSM
 * hooks but does not export them to modules, these return -ENOTTY: the operation is
 * refused and the library falls back to the plain syscall, which runs the checks.
 */
int fsock_sec_listen(struct socket *sock, int backlog);
int fsock_sec_accept(struct socket *sock, struct socket *newsock);
int fsock_sec_shutdown(struct socket *sock, int how);
int fsock_sec_bind(struct socket *sock, struct sockaddr *addr, int len);
extern int fsock_debug_level;		/* module parameter `debug` (0..3) */

#define fsock_dbg(level, fmt, ...)						\
	do {									\
		if (unlikely(fsock_debug_level >= (level)))			\
			pr_info(FSOCK_NAME ": " fmt, ##__VA_ARGS__);		\
	} while (0)

#endif /* FASTSOCKET_INTERNAL_H */
