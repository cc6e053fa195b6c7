// SPDX-License-Identifier: GPL-2.0
/*
 * Fastsocket core: module parameters, /dev/fastsocket ioctls, /proc/net/fastsocket.
 * Everything kernel-version or backend specific lives in the backend (see
 * fastsocket_internal.h); this file compiles on 2.6.32 (el6) and 6.x.
 */
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/init.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/uaccess.h>
#include <linux/proc_fs.h>
#include <linux/seq_file.h>
#include <linux/sched.h>
#include <linux/cpumask.h>
#include <linux/net.h>
#include <linux/mutex.h>
#include <linux/file.h>
#include <linux/security.h>
#include <linux/in.h>
#include <net/net_namespace.h>
#include <net/sock.h>

#include "fastsocket_internal.h"

#if LINUX_VERSION_CODE < KERNEL_VERSION(2, 6, 36)
#define FSOCK_KP_CONST		/* kernel_param callbacks lost their const in 2.6.36 */
#else
#define FSOCK_KP_CONST const
#endif

#if LINUX_VERSION_CODE < KERNEL_VERSION(4, 6, 0)
#define FSOCK_PARAM_NL ""	/* sysfs appended the newline itself */
#else
#define FSOCK_PARAM_NL "\n"
#endif

#if LINUX_VERSION_CODE < KERNEL_VERSION(2, 6, 39)
#define fsock_kstrtol(s, v) strict_strtol(s, 10, v)
#else
#define fsock_kstrtol(s, v) kstrtol(s, 10, v)
#endif

#ifndef pr_warn_ratelimited	/* 2.6.32 */
#define pr_warn_ratelimited pr_warning_ratelimited
#endif

#ifndef READ_ONCE	/* 2.6.32 */
#define READ_ONCE(x) ACCESS_ONCE(x)
#define WRITE_ONCE(x, v) (ACCESS_ONCE(x) = (v))
#endif

DEFINE_PER_CPU(struct fsock_stats, fsock_stats);

/* Parameter storage: what the user asked for (sysfs shows the kernel's value instead when
 * the backend can read it). Writers serialise on fsock_param_lock.
 */
static int fsock_params[FSOCK_PARAM_NR] = { 2, 1, 0 };
static const int fsock_param_max[FSOCK_PARAM_NR] = { 2, 1, 1 };
static const char *const fsock_param_names[FSOCK_PARAM_NR] = {
	"enable_listen_spawn", "enable_fast_epoll", "enable_receive_flow_deliver",
};
int fsock_debug_level;
static DEFINE_MUTEX(fsock_param_lock);
static bool fsock_ready;		/* backend initialised: params go to the kernel */
static bool fsock_unsupported_told[FSOCK_PARAM_NR];

static bool fsock_backend_has(enum fsock_param p)
{
	return fsock_backend.features & fsock_param_feature(p);
}

int fsock_param(enum fsock_param p)
{
	if (fsock_ready && fsock_backend_has(p) && fsock_backend.get_param) {
		int v = fsock_backend.get_param(p);

		if (v >= 0)
			return v;
	}
	return READ_ONCE(fsock_params[p]);
}

/* Apply one parameter to the backend; caller holds fsock_param_lock. */
static int fsock_apply_param(enum fsock_param p, int val)
{
	if (!fsock_backend_has(p)) {
		if (val && !fsock_unsupported_told[p]) {
			fsock_unsupported_told[p] = true;
			pr_info(FSOCK_NAME ": %s=%d has no effect: backend '%s' has no such kernel feature (value kept, feature bit off)\n",
				fsock_param_names[p], val, fsock_backend.name);
		}
		return 0;
	}
	return fsock_backend.set_param ? fsock_backend.set_param(p, val) : 0;
}

static int fsock_param_index(FSOCK_KP_CONST struct kernel_param *kp)
{
	return (int *)kp->arg - fsock_params;
}

static int fsock_param_set(const char *val, FSOCK_KP_CONST struct kernel_param *kp)
{
	int p = fsock_param_index(kp);
	long v;
	int err;

	if (!val || fsock_kstrtol(val, &v) || v < 0 || v > fsock_param_max[p])
		return -EINVAL;
	mutex_lock(&fsock_param_lock);
	err = fsock_ready ? fsock_apply_param(p, v) : 0;
	if (!err)
		WRITE_ONCE(fsock_params[p], v);
	mutex_unlock(&fsock_param_lock);
	return err;
}

static int fsock_param_get(char *buf, FSOCK_KP_CONST struct kernel_param *kp)
{
	return sprintf(buf, "%d" FSOCK_PARAM_NL, fsock_param(fsock_param_index(kp)));
}

module_param_call(enable_listen_spawn, fsock_param_set, fsock_param_get,
		  &fsock_params[FSOCK_PARAM_LISTEN_SPAWN], 0644);
MODULE_PARM_DESC(enable_listen_spawn,
		 "per-CPU local listen sockets: 0 off, 1 application pins workers, 2 module pins workers (default 2)");
module_param_call(enable_fast_epoll, fsock_param_set, fsock_param_get,
		  &fsock_params[FSOCK_PARAM_FAST_EPOLL], 0644);
MODULE_PARM_DESC(enable_fast_epoll, "cache the epoll item in the socket file: 0/1 (default 1)");
module_param_call(enable_receive_flow_deliver, fsock_param_set, fsock_param_get,
		  &fsock_params[FSOCK_PARAM_RFD], 0644);
MODULE_PARM_DESC(enable_receive_flow_deliver,
		 "steer packets of active connections to the CPU that opened them: 0/1 (default 0)");

static int fsock_debug_set(const char *val, FSOCK_KP_CONST struct kernel_param *kp)
{
	long v;

	if (!val || fsock_kstrtol(val, &v) || v < 0 || v > 3)
		return -EINVAL;
	WRITE_ONCE(fsock_debug_level, v);
	return 0;
}

static int fsock_debug_get(char *buf, FSOCK_KP_CONST struct kernel_param *kp)
{
	return sprintf(buf, "%d" FSOCK_PARAM_NL, READ_ONCE(fsock_debug_level));
}

module_param_call(debug, fsock_debug_set, fsock_debug_get, &fsock_debug_level, 0644);
MODULE_PARM_DESC(debug, "log level 0..3 (default 0)");

/* ---- ioctls ---------------------------------------------------------------------- */

static __u32 fsock_features(void)
{
	__u32 f = fsock_backend.features;
	int p;

	/* Switchable features are reported only while switched on. */
	for (p = 0; p < FSOCK_PARAM_NR; p++)
		if (!fsock_param(p))
			f &= ~fsock_param_feature(p);
	return f;
}

/* ---- LSM checks ------------------------------------------------------------------ */

/*
 * Without CONFIG_SECURITY_NETWORK the hooks are inline no-ops; built in, the module can
 * call them; as a module only if the kernel exports them (Kbuild finds the exports in
 * Module.symvers or security/security.c and defines FSOCK_SOCKET_LSM_EXPORTED).
 */
#if !defined(CONFIG_SECURITY_NETWORK) || defined(FSOCK_SOCKET_LSM_EXPORTED) || !defined(MODULE)
#define FSOCK_LSM_CALLABLE 1
#else
#define FSOCK_LSM_CALLABLE 0
#endif

#if FSOCK_LSM_CALLABLE
int fsock_sec_listen(struct socket *sock, int backlog)
{
	return security_socket_listen(sock, backlog);
}

int fsock_sec_accept(struct socket *sock, struct socket *newsock)
{
	return security_socket_accept(sock, newsock);
}

int fsock_sec_shutdown(struct socket *sock, int how)
{
	return security_socket_shutdown(sock, how);
}

int fsock_sec_bind(struct socket *sock, struct sockaddr *addr, int len)
{
	return security_socket_bind(sock, addr, len);
}
#else
/* Fail closed: the library then makes the plain syscall, which runs the LSM. */
int fsock_sec_listen(struct socket *sock, int backlog)
{
	return -ENOTTY;
}

int fsock_sec_accept(struct socket *sock, struct socket *newsock)
{
	return -ENOTTY;
}

int fsock_sec_shutdown(struct socket *sock, int how)
{
	return -ENOTTY;
}

int fsock_sec_bind(struct socket *sock, struct sockaddr *addr, int len)
{
	return -ENOTTY;
}
#endif

/* ---- CPU placement ------------------------------------------------------------------ */

#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 3, 0)
#define fsock_task_cpus(t) ((t)->cpus_ptr)
#else
#define fsock_task_cpus(t) (&(t)->cpus_allowed)
#endif

/*
 * What sched_setaffinity(2) of itself would refuse before the pin: narrowing a
 * SCHED_DEADLINE task (its bandwidth is admitted per root domain). Its LSM check
 * (security_task_setscheduler) is not exported to modules: see module/README.md.
 */
static int fsock_may_pin(void)
{
#ifdef SCHED_DEADLINE
	if (current->policy == SCHED_DEADLINE)
		return -EBUSY;
#endif
	return 0;
}

/*
 * Where a SPAWN's worker runs, with sched_setaffinity(2) semantics: the module only ever
 * narrows the caller's own allowed mask (which the cpuset already bounds), never widens
 * it, and never moves a caller that already runs on one CPU (pinned by itself, by its
 * cpuset or by an earlier SPAWN): that CPU is then the one for all its listeners.
 */
struct fsock_place {
	int cpu;
	bool pin;		/* mode 2: narrow the caller to `cpu` */
	cpumask_var_t old;	/* the caller's mask before, to undo a pin */
};

/* Round-robin over `allowed`: workers forked together usually start on the same CPU. */
static int fsock_next_cpu(const struct cpumask *allowed)
{
	static atomic_t next = ATOMIC_INIT(0);
	unsigned int n = (unsigned int)atomic_inc_return(&next) % cpumask_weight(allowed);
	int cpu;

	for_each_cpu(cpu, allowed)
		if (n-- == 0)
			break;
	return cpu;
}

/* Fill `pl` for a SPAWN asking for `cpu` (-1: choose) in listen-spawn `mode`. */
static int fsock_place_cpu(struct fsock_place *pl, int cpu, int mode)
{
	cpumask_var_t allowed;
	int err = 0;

	if (cpu != -1 && (cpu < 0 || cpu >= nr_cpu_ids || !cpu_online(cpu)))
		return -EINVAL;
	pl->pin = false;
	pl->cpu = cpu == -1 ? raw_smp_processor_id() : cpu;
	if (mode != 2)
		return 0;	/* mode 1: the application places its workers */
	if (!alloc_cpumask_var(&allowed, GFP_KERNEL))
		return -ENOMEM;
	cpumask_copy(pl->old, fsock_task_cpus(current));
	cpumask_and(allowed, pl->old, cpu_online_mask);
	if (cpumask_empty(allowed))
		err = -EINVAL;
	else if (cpumask_weight(allowed) == 1)
		pl->cpu = cpumask_first(allowed);	/* keeps its CPU */
	else if (cpu == -1)
		pl->cpu = fsock_next_cpu(allowed);
	if (!err && cpu != -1 && cpu != pl->cpu)
		err = -EINVAL;	/* another CPU than the one it is on */
	if (!err && !cpumask_test_cpu(pl->cpu, allowed))
		err = -EINVAL;	/* outside its own mask (or its cpuset): never widen */
	pl->pin = !err && cpumask_weight(allowed) > 1;
	if (pl->pin) {
		err = fsock_may_pin();
		pl->pin = !err;
	}
	free_cpumask_var(allowed);
	return err;
}

static int fsock_pin(struct fsock_place *pl)
{
	return pl->pin ? set_cpus_allowed_ptr(current, cpumask_of(pl->cpu)) : 0;
}

/* Undo fsock_pin() after a failure: the caller's own earlier mask. */
static void fsock_unpin(struct fsock_place *pl)
{
	if (pl->pin && set_cpus_allowed_ptr(current, pl->old))
		pr_warn_ratelimited(FSOCK_NAME ": pid %d: CPU mask not restored\n", current->pid);
}

static long fsock_do_version(void __user *uarg)
{
	struct fsock_version v;

	memset(&v, 0, sizeof(v));
	v.abi = FASTSOCKET_ABI_VERSION;
	v.features = fsock_features();
	v.listen_spawn = fsock_param(FSOCK_PARAM_LISTEN_SPAWN);
	return copy_to_user(uarg, &v, sizeof(v)) ? -EFAULT : 0;
}

static long fsock_do_socket(void __user *uarg)
{
	struct fsock_socket_args a;
	int fd;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	/* The fd is installed by the backend: make sure the answer can be written first
	 * (writing the same bytes back), so a bad pointer does not leak an unreported fd.
	 */
	if (copy_to_user(uarg, &a, sizeof(a)))
		return -EFAULT;
	fd = fsock_backend.socket(a.family, a.type, a.protocol);
	if (fd < 0)
		return fd;
	a.fd = fd;
	/* Only a concurrent munmap() can fail this now; the fd then stays the caller's. */
	return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
}

static long fsock_do_listen(void __user *uarg)
{
	struct fsock_listen_args a;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	return fsock_backend.listen(a.fd, a.backlog);
}

/*
 * The caller's fd for a local socket file. 2.6.32 exports no fd allocator taking flags
 * (alloc_fd is not exported); the el6 backend keeps its local sockets in the kernel and
 * never hands out a file, so nothing is installed there.
 */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(3, 10, 0)
static int fsock_reserve_fd(void)
{
	return get_unused_fd_flags(O_CLOEXEC);
}
#else
static int fsock_reserve_fd(void)
{
	return -EOPNOTSUPP;
}
#endif

/*
 * Order: place and pin (nothing to undo yet), spawn, answer, install. Every failure after
 * the pin undoes it, and the local socket's fd is installed only after the answer reached
 * user space, so no error leaves an fd or a receiving local socket behind.
 */
static long fsock_do_spawn(void __user *uarg)
{
	struct fsock_spawn_args a;
	struct fsock_place pl;
	struct file *local = NULL;
	int mode, err, fd = -1;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	mode = fsock_param(FSOCK_PARAM_LISTEN_SPAWN);
	if (!mode)
		return -EOPNOTSUPP;
	if (!alloc_cpumask_var(&pl.old, GFP_KERNEL))
		return -ENOMEM;
	err = fsock_place_cpu(&pl, a.cpu, mode);
	if (err)
		goto out;
	err = fsock_pin(&pl);
	if (!err)
		err = fsock_backend.spawn(a.fd, pl.cpu, &local);
	if (!err && local) {
		fd = fsock_reserve_fd();
		err = fd < 0 ? fd : 0;
	}
	a.cpu = pl.cpu;
	a.local_fd = fd;
	if (!err && copy_to_user(uarg, &a, sizeof(a)))
		err = -EFAULT;
	if (err) {
		if (local)
			fput(local);	/* a fresh local socket leaves its group here */
		if (fd >= 0)
			put_unused_fd(fd);
		fsock_unpin(&pl);
		goto out;
	}
	if (local)
		fd_install(fd, local);
	fsock_dbg(1, "pid %d spawned fd %d for cpu %d: local fd %d\n",
		  current->pid, a.fd, a.cpu, a.local_fd);
out:
	free_cpumask_var(pl.old);
	return err;
}

static long fsock_do_spawn_all(void)
{
	struct fsock_place pl;
	int mode, n;

	mode = fsock_param(FSOCK_PARAM_LISTEN_SPAWN);
	if (!mode)
		return -EOPNOTSUPP;
	if (!fsock_backend.spawn_all)
		return 0;
	if (!alloc_cpumask_var(&pl.old, GFP_KERNEL))
		return -ENOMEM;
	n = fsock_place_cpu(&pl, -1, mode);
	if (!n)
		n = fsock_pin(&pl);
	if (!n) {
		n = fsock_backend.spawn_all(pl.cpu);
		if (n <= 0)
			fsock_unpin(&pl);	/* nothing spawned: no reason to stay there */
	}
	free_cpumask_var(pl.old);
	return n;
}

static long fsock_do_accept(void __user *uarg)
{
	struct fsock_accept_args a;
	int fd;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.flags & ~(SOCK_NONBLOCK | SOCK_CLOEXEC))
		return -EINVAL;
	if (copy_to_user(uarg, &a, sizeof(a)))	/* as SOCKET: no unreported fd */
		return -EFAULT;
	fd = fsock_backend.accept(a.fd, raw_smp_processor_id(), a.flags,
				  (struct sockaddr __user *)(unsigned long)a.addr,
				  (int __user *)(unsigned long)a.addrlen);
	if (fd < 0)
		return fd;
	a.new_fd = fd;
	return copy_to_user(uarg, &a, sizeof(a)) ? -EFAULT : 0;
}

/* A TCP socket (IPv4 or IPv6): the only kind SOCKET makes and CLOSE takes. */
static bool fsock_is_tcp(const struct socket *sock)
{
	const struct sock *sk = sock->sk;

	return sk && (sk->sk_family == AF_INET || sk->sk_family == AF_INET6) &&
	       sk->sk_type == SOCK_STREAM && sk->sk_protocol == IPPROTO_TCP;
}

/*
 * CLOSE and SHUTDOWN stand in for close(2)/shutdown(2) on the TCP sockets the library hands
 * them: any other fd (the device itself, a pipe) is refused, so a stray CLOSE cannot pull the
 * device out from under the caller's next ioctl, and so is any other socket (unix, UDP),
 * which no Fastsocket path makes (the library then calls close(2)/shutdown(2) itself).
 */
static int fsock_tcp_fd(int fd)
{
	struct socket *sock;
	int err;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	err = fsock_is_tcp(sock) ? 0 : -EOPNOTSUPP;
	sockfd_put(sock);
	return err;
}

static long fsock_do_close(void __user *uarg)
{
	struct fsock_close_args a;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	err = fsock_tcp_fd(a.fd);
	if (err)
		return err;
	return fsock_backend.close(a.fd);
}

static long fsock_do_shutdown(void __user *uarg)
{
	struct fsock_shutdown_args a;
	int err;

	if (copy_from_user(&a, uarg, sizeof(a)))
		return -EFAULT;
	if (a.how < SHUT_RD || a.how > SHUT_RDWR)
		return -EINVAL;
	err = fsock_tcp_fd(a.fd);
	if (err)
		return err;
	return fsock_backend.shutdown(a.fd, a.how);
}

static long fsk_dev_ioctl(struct file *filp, unsigned int cmd, unsigned long arg)
{
	void __user *uarg = (void __user *)arg;

	fsock_dbg(3, "pid %d cpu %d ioctl %#x\n", current->pid, raw_smp_processor_id(), cmd);
	switch (cmd) {
	case FSOCK_IOC_VERSION:
		return fsock_do_version(uarg);
	case FSOCK_IOC_SOCKET:
		return fsock_do_socket(uarg);
	case FSOCK_IOC_LISTEN:
		return fsock_do_listen(uarg);
	case FSOCK_IOC_SPAWN:
		return fsock_do_spawn(uarg);
	case FSOCK_IOC_ACCEPT:
		return fsock_do_accept(uarg);
	case FSOCK_IOC_CLOSE:
		return fsock_do_close(uarg);
	case FSOCK_IOC_SHUTDOWN:
		return fsock_do_shutdown(uarg);
	case FSOCK_IOC_SPAWN_ALL:
		return fsock_do_spawn_all();
	}
	return -ENOTTY;
}

static const struct file_operations fsock_fops = {
	.owner		= THIS_MODULE,	/* no unload while /dev/fastsocket is open */
	.unlocked_ioctl	= fsk_dev_ioctl,
#ifdef CONFIG_COMPAT
	.compat_ioctl	= fsk_dev_ioctl,	/* fixed-width ABI: same layout for 32-bit callers */
#endif
};

static struct miscdevice fsock_misc = {
	.minor	= MISC_DYNAMIC_MINOR,
	.name	= FSOCK_NAME,
	.fops	= &fsock_fops,
	.mode	= 0666,		/* every operation is one the caller may do on its own sockets */
};

/* ---- /proc/net/fastsocket -------------------------------------------------------- */

static int fsock_stats_show(struct seq_file *m, void *v)
{
	int cpu, i;

	seq_puts(m, "cpu local_lookups global_lookups local_accepts global_accepts steered\n");
	for_each_possible_cpu(cpu) {
		struct fsock_stats s = per_cpu(fsock_stats, cpu);

		if (fsock_backend.read_stats)
			fsock_backend.read_stats(cpu, &s);
		seq_printf(m, "cpu%d", cpu);
		for (i = 0; i < FSOCK_STAT_NR; i++)
			seq_printf(m, " %lu", s.v[i]);
		seq_putc(m, '\n');
	}
	return 0;
}

static int fsock_stats_open(struct inode *inode, struct file *file)
{
	return single_open(file, fsock_stats_show, NULL);
}

#if LINUX_VERSION_CODE >= KERNEL_VERSION(5, 6, 0)
static const struct proc_ops fsock_stats_fops = {
	.proc_open	= fsock_stats_open,
	.proc_read	= seq_read,
	.proc_lseek	= seq_lseek,
	.proc_release	= single_release,
};
#else
static const struct file_operations fsock_stats_fops = {
	.owner		= THIS_MODULE,
	.open		= fsock_stats_open,
	.read		= seq_read,
	.llseek		= seq_lseek,
	.release	= single_release,
};
#endif

/* ---- init / exit ----------------------------------------------------------------- */

static int __init fsock_init(void)
{
	int p, err;

	err = fsock_backend.init ? fsock_backend.init() : 0;
	if (err)
		return err;
	/* Load-time values reach the kernel switches now that the backend is up. */
	mutex_lock(&fsock_param_lock);
	fsock_ready = true;
	for (p = 0; p < FSOCK_PARAM_NR && !err; p++)
		err = fsock_apply_param(p, fsock_params[p]);
	mutex_unlock(&fsock_param_lock);
	if (err)
		goto out_backend;
	if (!proc_create(FSOCK_NAME, 0444, init_net.proc_net, &fsock_stats_fops)) {
		err = -ENOMEM;
		goto out_backend;
	}
	err = misc_register(&fsock_misc);
	if (err)
		goto out_proc;
	if (!FSOCK_LSM_CALLABLE)
		pr_warn(FSOCK_NAME ": the kernel does not export its socket LSM hooks: ioctls that need them are refused (plain syscalls are used)\n");
	pr_info(FSOCK_NAME ": loaded, backend %s, features %#x, listen_spawn %d\n",
		fsock_backend.name, fsock_features(), fsock_param(FSOCK_PARAM_LISTEN_SPAWN));
	return 0;

out_proc:
	remove_proc_entry(FSOCK_NAME, init_net.proc_net);
out_backend:
	mutex_lock(&fsock_param_lock);
	fsock_ready = false;
	mutex_unlock(&fsock_param_lock);
	if (fsock_backend.exit)
		fsock_backend.exit();
	return err;
}

static void __exit fsock_exit(void)
{
	misc_deregister(&fsock_misc);
	remove_proc_entry(FSOCK_NAME, init_net.proc_net);
	mutex_lock(&fsock_param_lock);
	fsock_ready = false;
	mutex_unlock(&fsock_param_lock);
	if (fsock_backend.exit)
		fsock_backend.exit();
	pr_info(FSOCK_NAME ": unloaded\n");
}

module_init(fsock_init);
module_exit(fsock_exit);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("Fastsocket: per-CPU listen sockets and /dev/fastsocket");
MODULE_VERSION("1.0");
