// SPDX-License-Identifier: GPL-2.0
/*
 * Fastsocket backend for kernels carrying the Fastsocket patches
 * (patches/el6: include/net/fastsocket.h, FASTSOCKET_KERNEL_API 1).
 *
 * Listen spawn: the kernel keeps per-CPU local listen tables.  SPAWN creates a kernel
 * socket and makes it the local listener of a global listen socket for one CPU
 * (inet_csk_listen_local()); the kernel's listener lookup then queues SYNs received on
 * that CPU on it.  Local sockets have no fd (local_fd = -1): the application keeps using
 * the global fd, whose poll() includes the polling CPU's local queue and whose waiters
 * the local wakes (kernel side).  ACCEPT takes from the caller CPU's local socket, then
 * the global one, alternating while the global queue is not empty.
 *
 * Fast epoll and receive flow deliver live in the kernel: set_param/get_param write and
 * read the kernel's own switches (fastsocket_fast_epoll, fastsocket_rfd), so the module
 * parameters never shadow them.  The kernel counts listener lookups and steered packets
 * (read_stats adds them); this backend counts accepts.
 *
 * Lifetime.  A group (one per global socket with locals) holds a reference on the
 * global sock and one fsock_el6_local per CPU with a local socket.  When the global
 * stops listening (close, shutdown, disconnect) the kernel calls our listen-stop hook
 * (atomic context, global locked): the group leaves the list, its locals are unhashed
 * at once (no new SYN lands on them) and released from a workqueue once no ACCEPT uses
 * them (users count).  Lookups of groups and locals are RCU; memory is freed after a
 * grace period.  Connections still queued on a local socket at that point are reset,
 * as for any listener that is closed.  Module exit tears all groups down the same way.
 *
 * VFS shortcut: sockets made by SOCKET and ACCEPT come from fastsocket_sock_create() /
 * fastsocket_sock_create_lite() (patch 0005), so their inodes and dentries stay off the
 * VFS lists and neither creating nor closing them takes inode_lock or dcache_lock.
 *
 * Written for 2.6.32 (gcc 4.4, C89 style) and builds with the host gcc 12 as well.
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/net.h>
#include <linux/file.h>
#include <linux/fdtable.h>
#include <linux/list.h>
#include <linux/mutex.h>
#include <linux/rcupdate.h>
#include <linux/slab.h>
#include <linux/socket.h>
#include <linux/spinlock.h>
#include <linux/syscalls.h>
#include <linux/uaccess.h>
#include <linux/workqueue.h>
#include <linux/in.h>
#include <net/sock.h>
#include <net/tcp.h>
#include <net/inet_connection_sock.h>
#include <net/inet_hashtables.h>
#include <net/fastsocket.h>

#include "fastsocket_internal.h"

#if FASTSOCKET_KERNEL_API != 1
#error "backend_el6 is written for FASTSOCKET_KERNEL_API 1 (patches/el6)"
#endif

struct fsock_el6_local {
	struct socket *sock;
	atomic_t users;			/* 1 for the group + 1 per running ACCEPT */
	unsigned int turn;		/* ACCEPT alternation, only this CPU's workers */
	struct work_struct release;
	struct rcu_head rcu;
} ____cacheline_aligned_in_smp;

struct fsock_el6_group {
	struct list_head node;		/* fsock_groups (RCU) */
	struct sock *global;		/* reference held */
	struct rcu_head rcu;
	struct fsock_el6_local *local[0];	/* [nr_cpu_ids], RCU */
};

static LIST_HEAD(fsock_groups);
static DEFINE_SPINLOCK(fsock_groups_lock);	/* list changes; taken in the hook */
static DEFINE_MUTEX(fsock_spawn_lock);		/* serialises SPAWN */
static struct workqueue_struct *fsock_wq;

/* ---- groups and locals ------------------------------------------------------------ */

/* Caller holds rcu_read_lock or fsock_groups_lock. */
static struct fsock_el6_group *fsock_group_find(struct sock *global)
{
	struct fsock_el6_group *g;

	list_for_each_entry_rcu(g, &fsock_groups, node)
		if (g->global == global)
			return g;
	return NULL;
}

static void fsock_local_free_rcu(struct rcu_head *head)
{
	kfree(container_of(head, struct fsock_el6_local, rcu));
}

static void fsock_local_release_work(struct work_struct *work)
{
	struct fsock_el6_local *l = container_of(work, struct fsock_el6_local, release);

	sock_release(l->sock);	/* tcp_close: unhash, reset queued connections */
	call_rcu(&l->rcu, fsock_local_free_rcu);
}

static void fsock_local_put(struct fsock_el6_local *l)
{
	if (atomic_dec_and_test(&l->users))
		queue_work(fsock_wq, &l->release);
}

static void fsock_group_free_rcu(struct rcu_head *head)
{
	kfree(container_of(head, struct fsock_el6_group, rcu));
}

/*
 * Tear down a group already taken off the list: stop its locals from receiving SYNs
 * now, release them when their last ACCEPT is done.  Any context (the hook is atomic).
 */
static void fsock_group_teardown(struct fsock_el6_group *g)
{
	struct fsock_el6_local *l;
	int cpu;

	for (cpu = 0; cpu < nr_cpu_ids; cpu++) {
		l = g->local[cpu];
		if (!l)
			continue;
		rcu_assign_pointer(g->local[cpu], NULL);
		inet_unhash(l->sock->sk);
		fsock_local_put(l);
	}
	sock_put(g->global);
	call_rcu(&g->rcu, fsock_group_free_rcu);
}

/* Kernel hook: a global listener with locals stops listening (locked, atomic). */
static void fsock_el6_listen_stop(struct sock *global)
{
	struct fsock_el6_group *g;

	spin_lock_bh(&fsock_groups_lock);
	g = fsock_group_find(global);
	if (g)
		list_del_rcu(&g->node);
	spin_unlock_bh(&fsock_groups_lock);
	if (g) {
		fsock_dbg(2, "global listener %p stopped: dropping its locals\n", global);
		fsock_group_teardown(g);
	}
}

static struct fsock_el6_group *fsock_group_new(struct sock *global)
{
	struct fsock_el6_group *g;

	g = kzalloc(sizeof(*g) + nr_cpu_ids * sizeof(g->local[0]), GFP_KERNEL);
	if (!g)
		return NULL;
	sock_hold(global);
	g->global = global;
	return g;
}

/* ---- helpers ------------------------------------------------------------------------ */

static int fsock_is_tcp4(struct socket *sock)
{
	struct sock *sk = sock->sk;

	return sk && sk->sk_family == AF_INET && sk->sk_type == SOCK_STREAM &&
	       sk->sk_protocol == IPPROTO_TCP;
}

/* accept(2)'s address copy-out: truncate to the user's length, report the real one. */
static int fsock_put_addr(struct socket *newsock, struct sockaddr __user *uaddr,
			  int __user *uaddrlen)
{
	struct sockaddr_storage addr;
	int klen, ulen, err;

	if (!uaddr)
		return 0;
	if (!uaddrlen)
		return -EFAULT;
	err = newsock->ops->getname(newsock, (struct sockaddr *)&addr, &klen, 2);
	if (err < 0)
		return -ECONNABORTED;
	if (get_user(ulen, uaddrlen))
		return -EFAULT;
	if (ulen < 0)
		return -EINVAL;
	if (ulen > klen)
		ulen = klen;
	if (ulen && copy_to_user(uaddr, &addr, ulen))
		return -EFAULT;
	return put_user(klen, uaddrlen);
}

#ifdef FASTSOCKET_NOLIST_SOCKETS
/* kernel_accept() with a socket whose file skips the global VFS locks. */
static int fsock_kernel_accept(struct socket *lsock, struct socket **newsock, int flags)
{
	struct sock *sk = lsock->sk;
	int err;

	err = fastsocket_sock_create_lite(sk->sk_family, sk->sk_type, sk->sk_protocol,
					  newsock);
	if (err < 0)
		return err;
	err = lsock->ops->accept(lsock, *newsock, flags);
	if (err < 0) {
		sock_release(*newsock);
		*newsock = NULL;
		return err;
	}
	(*newsock)->ops = lsock->ops;
	__module_get((*newsock)->ops->owner);
	return 0;
}
#define fsock_sock_create	fastsocket_sock_create
#else	/* a kernel without patch 0005: ordinary socket files */
#define fsock_kernel_accept	kernel_accept
#define fsock_sock_create	sock_create
#endif

/* One non-blocking accept on a listen socket; the new socket gets an fd. */
static int fsock_accept_one(struct socket *lsock, int flags,
			    struct sockaddr __user *uaddr, int __user *uaddrlen)
{
	struct socket *newsock;
	int err, fd;

	err = fsock_kernel_accept(lsock, &newsock, O_NONBLOCK);
	if (err < 0)
		return err;
	err = fsock_put_addr(newsock, uaddr, uaddrlen);
	if (err < 0)
		goto fail;
	/* SOCK_NONBLOCK/SOCK_CLOEXEC are O_NONBLOCK/O_CLOEXEC */
	fd = sock_map_fd(newsock, flags & (O_NONBLOCK | O_CLOEXEC));
	if (fd >= 0)
		return fd;
	err = fd;
fail:
	sock_release(newsock);
	return err;
}

/* ---- backend ops ---------------------------------------------------------------------- */

static int fsock_el6_socket(int family, int type, int protocol)
{
	int flags = type & ~SOCK_TYPE_MASK;
	struct socket *sock;
	int err, fd;

	if (flags & ~(SOCK_CLOEXEC | SOCK_NONBLOCK))
		return -EINVAL;
	err = fsock_sock_create(family, type & SOCK_TYPE_MASK, protocol, &sock);
	if (err < 0)
		return err;
	fd = sock_map_fd(sock, flags & (O_NONBLOCK | O_CLOEXEC));
	if (fd < 0)
		sock_release(sock);
	return fd;
}

static int fsock_el6_listen(int fd, int backlog)
{
	struct socket *sock;
	int err, somaxconn;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	somaxconn = sock_net(sock->sk)->core.sysctl_somaxconn;
	if ((unsigned int)backlog > (unsigned int)somaxconn)
		backlog = somaxconn;
	err = kernel_listen(sock, backlog);
	sockfd_put(sock);
	return err;
}

/* Create the local listener of `sock` (a TCP/IPv4 listener) for `cpu`; mutex held. */
static int fsock_el6_spawn_locked(struct socket *sock, int cpu)
{
	struct sock *global = sock->sk;
	struct fsock_el6_group *g, *fresh = NULL;
	struct fsock_el6_local *l;
	struct tcp_sock *tp;
	int err, alive;

	if (!fsock_is_tcp4(sock))
		return -EOPNOTSUPP;
	if (global->sk_state != TCP_LISTEN || sock_flag(global, SOCK_FASTSOCKET_LOCAL))
		return -EINVAL;
	rcu_read_lock();
	g = fsock_group_find(global);
	if (g && g->local[cpu]) {
		rcu_read_unlock();
		return 0;		/* idempotent per CPU */
	}
	rcu_read_unlock();

	l = kzalloc(sizeof(*l), GFP_KERNEL);
	if (!l)
		return -ENOMEM;
	atomic_set(&l->users, 1);
	INIT_WORK(&l->release, fsock_local_release_work);
	err = __sock_create(sock_net(global), AF_INET, SOCK_STREAM, IPPROTO_TCP,
			    &l->sock, 1);
	if (err < 0)
		goto out_free;
	/* TCP-level options children inherit (the kernel copies socket-level ones). */
	tp = tcp_sk(l->sock->sk);
	tp->nonagle = tcp_sk(global)->nonagle;
	tp->keepalive_time = tcp_sk(global)->keepalive_time;
	tp->keepalive_intvl = tcp_sk(global)->keepalive_intvl;
	tp->keepalive_probes = tcp_sk(global)->keepalive_probes;
	tp->linger2 = tcp_sk(global)->linger2;
	tp->window_clamp = tcp_sk(global)->window_clamp;

	/*
	 * A new group is listed before the local exists, so that once the kernel has
	 * flagged the global (inet_csk_listen_local), its listen-stop hook finds the group.
	 */
	if (!g) {
		fresh = fsock_group_new(global);
		if (!fresh) {
			err = -ENOMEM;
			goto out_sock;
		}
		spin_lock_bh(&fsock_groups_lock);
		list_add_tail_rcu(&fresh->node, &fsock_groups);
		spin_unlock_bh(&fsock_groups_lock);
		g = fresh;
	}
	err = inet_csk_listen_local(l->sock->sk, global, cpu);

	/* The hook may have torn the group down meanwhile (the global stopped listening). */
	spin_lock_bh(&fsock_groups_lock);
	alive = fsock_group_find(global) == g;
	if (alive && !err)
		rcu_assign_pointer(g->local[cpu], l);
	else if (alive && fresh)
		list_del_rcu(&g->node);		/* ours alone: nothing was spawned */
	else
		fresh = NULL;			/* in use, or the hook owns its teardown */
	spin_unlock_bh(&fsock_groups_lock);
	if (!err && alive) {
		fsock_dbg(1, "local listener for cpu %d of %p\n", cpu, global);
		return 0;
	}
	if (fresh) {
		sock_put(fresh->global);
		call_rcu(&fresh->rcu, fsock_group_free_rcu);
	}
	if (!err) {
		fsock_local_put(l);	/* listening already: release from the workqueue */
		return -EINVAL;
	}
out_sock:
	sock_release(l->sock);
out_free:
	kfree(l);
	return err;
}

static int fsock_el6_spawn(int fd, int cpu, struct file **local)
{
	struct socket *sock;
	int err;

	*local = NULL;		/* local sockets stay inside the kernel */
	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	mutex_lock(&fsock_spawn_lock);
	err = fsock_el6_spawn_locked(sock, cpu);
	mutex_unlock(&fsock_spawn_lock);
	sockfd_put(sock);
	return err;
}

/* After fork: a local for `cpu` of every TCP/IPv4 listener the caller has an fd for. */
static int fsock_el6_spawn_all(int cpu)
{
	struct files_struct *files = current->files;
	unsigned int fd, max_fds;
	struct socket *sock;
	int n = 0, err;

	rcu_read_lock();
	max_fds = files_fdtable(files)->max_fds;
	rcu_read_unlock();
	mutex_lock(&fsock_spawn_lock);
	for (fd = 0; fd < max_fds; fd++) {
		rcu_read_lock();
		if (!fcheck_files(files, fd)) {
			rcu_read_unlock();
			continue;
		}
		rcu_read_unlock();
		sock = sockfd_lookup(fd, &err);
		if (!sock)
			continue;
		if (fsock_is_tcp4(sock) && sock->sk->sk_state == TCP_LISTEN &&
		    !sock_flag(sock->sk, SOCK_FASTSOCKET_LOCAL) &&
		    fsock_el6_spawn_locked(sock, cpu) == 0)
			n++;
		sockfd_put(sock);
	}
	mutex_unlock(&fsock_spawn_lock);
	return n;
}

static int fsock_el6_accept(int fd, int cpu, int flags, struct sockaddr __user *uaddr,
			    int __user *uaddrlen)
{
	struct fsock_el6_local *l = NULL;
	struct fsock_el6_group *g;
	struct socket *sock;
	int err, global_first;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	if (cpu >= 0 && cpu < nr_cpu_ids) {
		rcu_read_lock();
		g = fsock_group_find(sock->sk);
		if (g) {
			l = rcu_dereference(g->local[cpu]);
			if (l && !atomic_inc_not_zero(&l->users))
				l = NULL;
		}
		rcu_read_unlock();
	}
	if (!l) {
		err = fsock_accept_one(sock, flags, uaddr, uaddrlen);
		if (err >= 0)
			fsock_stat_inc(FSOCK_STAT_GLOBAL_ACCEPT);
		goto out;
	}
	/* While the global queue has connections, take it every other time. */
	global_first = !reqsk_queue_empty(&inet_csk(sock->sk)->icsk_accept_queue) &&
		       (l->turn++ & 1);
	if (!global_first) {
		err = fsock_accept_one(l->sock, flags, uaddr, uaddrlen);
		if (err >= 0) {
			fsock_stat_inc(FSOCK_STAT_LOCAL_ACCEPT);
			goto out_local;
		}
		if (err != -EAGAIN)
			goto out_local;
	}
	err = fsock_accept_one(sock, flags, uaddr, uaddrlen);
	if (err >= 0) {
		fsock_stat_inc(FSOCK_STAT_GLOBAL_ACCEPT);
	} else if (err == -EAGAIN && global_first) {
		err = fsock_accept_one(l->sock, flags, uaddr, uaddrlen);
		if (err >= 0)
			fsock_stat_inc(FSOCK_STAT_LOCAL_ACCEPT);
	}
out_local:
	fsock_local_put(l);
out:
	sockfd_put(sock);
	return err;
}

static int fsock_el6_close(int fd)
{
	/* The last close of a global listener reaches the listen-stop hook. */
	return sys_close(fd);
}

static int fsock_el6_shutdown(int fd, int how)
{
	struct socket *sock;
	int err;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	err = kernel_sock_shutdown(sock, how);
	sockfd_put(sock);
	return err;
}

static int fsock_el6_set_param(enum fsock_param p, int val)
{
	switch (p) {
	case FSOCK_PARAM_FAST_EPOLL:
		fastsocket_fast_epoll = !!val;
		break;
	case FSOCK_PARAM_RFD:
		fastsocket_rfd = !!val;
		break;
	default:
		break;		/* listen spawn: no kernel switch, local tables are per socket */
	}
	return 0;
}

static int fsock_el6_get_param(enum fsock_param p)
{
	switch (p) {
	case FSOCK_PARAM_FAST_EPOLL:
		return fastsocket_fast_epoll;
	case FSOCK_PARAM_RFD:
		return fastsocket_rfd;
	default:
		return -1;
	}
}

static void fsock_el6_read_stats(int cpu, struct fsock_stats *out)
{
	struct fastsocket_kstats k;

	fastsocket_read_kstats(cpu, &k);
	out->v[FSOCK_STAT_LOCAL_LOOKUP] += k.local_lookups;
	out->v[FSOCK_STAT_GLOBAL_LOOKUP] += k.global_lookups;
	out->v[FSOCK_STAT_STEERED] += k.steered;
}

static int fsock_el6_init(void)
{
	int err;

	fsock_wq = create_singlethread_workqueue(FSOCK_NAME);
	if (!fsock_wq)
		return -ENOMEM;
	err = fastsocket_register_listen_stop(fsock_el6_listen_stop);
	if (err) {
		destroy_workqueue(fsock_wq);
		return err;
	}
	return 0;
}

static void fsock_el6_exit(void)
{
	struct fsock_el6_group *g;

	/* No hook runs after this; the kernel switches go back to off. */
	fastsocket_unregister_listen_stop();
	fastsocket_fast_epoll = 0;
	fastsocket_rfd = 0;
	for (;;) {
		spin_lock_bh(&fsock_groups_lock);
		g = list_empty(&fsock_groups) ? NULL :
			list_first_entry(&fsock_groups, struct fsock_el6_group, node);
		if (g)
			list_del_rcu(&g->node);
		spin_unlock_bh(&fsock_groups_lock);
		if (!g)
			break;
		/* The global outlives us: it becomes an ordinary listener again. */
		lock_sock(g->global);
		sock_reset_flag(g->global, SOCK_FASTSOCKET_GLOBAL);
		release_sock(g->global);
		fsock_group_teardown(g);
	}
	destroy_workqueue(fsock_wq);	/* runs the pending local releases */
	rcu_barrier();			/* and the RCU frees, before our code goes */
}

const struct fsock_backend fsock_backend = {
	.name		= "el6",
	.features	= FSOCK_FEAT_LISTEN_SPAWN | FSOCK_FEAT_FAST_EPOLL | FSOCK_FEAT_RFD |
			  FSOCK_FEAT_KERNEL_HOOKS,
	.init		= fsock_el6_init,
	.exit		= fsock_el6_exit,
	.set_param	= fsock_el6_set_param,
	.get_param	= fsock_el6_get_param,
	.socket		= fsock_el6_socket,
	.listen		= fsock_el6_listen,
	.spawn		= fsock_el6_spawn,
	.spawn_all	= fsock_el6_spawn_all,
	.accept		= fsock_el6_accept,
	.close		= fsock_el6_close,
	.shutdown	= fsock_el6_shutdown,
	.read_stats	= fsock_el6_read_stats,
};
