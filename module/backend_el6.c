// SPDX-License-Identifier: GPL-2.0
/*
 * Fastsocket backend for kernels carrying the Fastsocket patches
 * (patches/el6: include/net/fastsocket.h, FASTSOCKET_KERNEL_API 2).
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
 * at once (no new SYN lands on them) and shut down from a workqueue (queued
 * connections are reset, as for any listener that is closed).  poll() of the global
 * waits on the polling CPU's local too, so a local's struct socket (its wait queue)
 * must outlive every poll and epoll entry of the global: the global gets our copy of
 * its proto_ops (owner = this module) whose release frees the locals, once no ACCEPT
 * uses them (users count).  Lookups of groups and locals are RCU.
 *
 * Security.  Every ioctl passes the LSM checks of its syscall (socket, bind + listen
 * for a local, listen, accept, shutdown); locals are created in the caller's context
 * (kern = 0), so SELinux labels them, and the connections accepted from them, like
 * the caller's own sockets.
 *
 * Orphans.  A local whose acceptor is gone must not strand its connections: the
 * kernel lets accept() of the global take them and poll() of the global report them
 * (no waiter on the local, or its CPU offline); this backend wakes the global's
 * waiters when an acceptor exits (after its files are closed) or a CPU goes offline.
 * An acceptor that SPAWNs on another CPU (re-pinned) leaves its old local without an
 * acceptor while its epoll entry still waits there, so the kernel does not count that
 * local as orphaned: the global's poll (our ops) reports the queue of any local whose
 * acceptor left, from every CPU, and the move wakes the global's waiters.
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
#include <linux/cpu.h>
#include <linux/delay.h>
#include <linux/notifier.h>
#include <linux/profile.h>
#include <linux/sched.h>
#include <linux/security.h>
#include <net/sock.h>
#include <net/tcp.h>
#include <net/inet_connection_sock.h>
#include <net/inet_hashtables.h>
#include <net/inet_common.h>
#include <net/fastsocket.h>

#include "fastsocket_internal.h"

#if FASTSOCKET_KERNEL_API != 2
#error "backend_el6 is written for FASTSOCKET_KERNEL_API 2 (patches/el6)"
#endif

struct fsock_el6_local {
	struct socket *sock;
	struct sock *global;		/* identity only: whose release frees us */
	struct list_head node;		/* fsock_locals, until the global's release */
	atomic_t users;			/* 1 for the global's life + 1 per running ACCEPT */
	unsigned int turn;		/* ACCEPT alternation, only this CPU's workers */
	struct task_struct *acceptor;	/* SPAWN caller (compared, never dereferenced) */
	struct task_struct *last_acceptor;	/* the one that exited (compared only) */
	int cpu;
	struct work_struct stop;	/* shut down once the global stopped listening */
	struct work_struct release;
	struct rcu_head rcu;
} ____cacheline_aligned_in_smp;

struct fsock_el6_group {
	struct list_head node;		/* fsock_groups (RCU) */
	struct sock *global;		/* reference held */
	struct rcu_head rcu;
	struct fsock_el6_local *local[0];	/* [nr_cpu_ids], RCU */
};

/* An acceptor that exited: wake the globals once its files (epoll sets) are gone. */
struct fsock_el6_exited {
	struct task_struct *task;	/* reference held */
	int tries;
	struct delayed_work work;
};

static LIST_HEAD(fsock_groups);
static LIST_HEAD(fsock_locals);			/* every local not yet released */
static DEFINE_SPINLOCK(fsock_groups_lock);	/* both lists; taken in the hook */
static DEFINE_MUTEX(fsock_spawn_lock);		/* serialises SPAWN */
static struct workqueue_struct *fsock_wq;
static struct proto_ops fsock_el6_global_ops;	/* inet_stream_ops + our release */
static atomic_t fsock_exited_pending = ATOMIC_INIT(0);
static int fsock_exit_nb_on;			/* task exit notifier registered */

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

static void fsock_local_put(struct fsock_el6_local *l)
{
	if (atomic_dec_and_test(&l->users))
		queue_work(fsock_wq, &l->release);
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

/* The global stopped listening: so does the local (resets what is queued on it);
 * its struct socket stays until the global is released. */
static void fsock_local_stop_work(struct work_struct *work)
{
	struct fsock_el6_local *l = container_of(work, struct fsock_el6_local, stop);

	kernel_sock_shutdown(l->sock, SHUT_RDWR);
	fsock_local_put(l);
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
		atomic_inc(&l->users);		/* for the stop work */
		queue_work(fsock_wq, &l->stop);
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

/* The global is released (last close of its file): free its locals, whose wait
 * queues its poll and epoll entries may use until now. */
static int fsock_el6_global_release(struct socket *sock)
{
	struct sock *global = sock->sk;
	struct fsock_el6_local *l, *tmp;
	LIST_HEAD(gone);
	int err;

	err = inet_stream_ops.release(sock);	/* tcp_close: the listen-stop hook runs */
	spin_lock_bh(&fsock_groups_lock);
	list_for_each_entry_safe(l, tmp, &fsock_locals, node)
		if (l->global == global)
			list_move(&l->node, &gone);
	spin_unlock_bh(&fsock_groups_lock);
	list_for_each_entry_safe(l, tmp, &gone, node) {
		list_del(&l->node);
		fsock_local_put(l);
	}
	return err;
}

/* Accepted sockets are ordinary: they get the original ops back (no module ref). */
static int fsock_el6_global_accept(struct socket *sock, struct socket *newsock, int flags)
{
	int err = inet_stream_ops.accept(sock, newsock, flags);

	if (!err && newsock->ops == &fsock_el6_global_ops) {
		newsock->ops = &inet_stream_ops;
		module_put(THIS_MODULE);	/* sock still holds one */
	}
	return err;
}

/*
 * Whether a local of `global` that lost its acceptor (exited or re-pinned) has
 * connections queued.  The poller holds the global's file, so the global is not
 * released and its locals' sockets live; RCU covers the group and the local.
 */
static int fsock_abandoned_ready(struct sock *global)
{
	struct fsock_el6_group *g;
	struct fsock_el6_local *l;
	int cpu, ready = 0;

	rcu_read_lock();
	g = fsock_group_find(global);
	for (cpu = 0; g && cpu < nr_cpu_ids && !ready; cpu++) {
		l = rcu_dereference(g->local[cpu]);
		ready = l && !ACCESS_ONCE(l->acceptor) &&
			!reqsk_queue_empty(&inet_csk(l->sock->sk)->icsk_accept_queue);
	}
	rcu_read_unlock();
	return ready;
}

/* The kernel's poll reports this CPU's local and the orphaned ones (no waiter); a
 * re-pinned acceptor still waits on its old local, woken by its connections: report
 * them to it from its new CPU (accept() of the global takes them). */
static unsigned int fsock_el6_global_poll(struct file *file, struct socket *sock,
					  poll_table *wait)
{
	unsigned int mask = inet_stream_ops.poll(file, sock, wait);

	if (!(mask & POLLIN) && sock->sk->sk_state == TCP_LISTEN &&
	    fsock_abandoned_ready(sock->sk))
		mask |= POLLIN | POLLRDNORM;
	return mask;
}

/* Wake every waiter of the globals with a local matching `match`. */
static void fsock_wake_globals(int (*match)(struct fsock_el6_local *l, long arg), long arg)
{
	struct fsock_el6_group *g;
	struct fsock_el6_local *l;
	int cpu;

	local_bh_disable();	/* sk_data_ready runs in softirq context otherwise */
	rcu_read_lock();
	list_for_each_entry_rcu(g, &fsock_groups, node)
		for (cpu = 0; cpu < nr_cpu_ids; cpu++) {
			l = rcu_dereference(g->local[cpu]);
			if (l && match(l, arg)) {
				g->global->sk_data_ready(g->global, 0);
				break;
			}
		}
	rcu_read_unlock();
	local_bh_enable();
}

static int fsock_local_on_cpu(struct fsock_el6_local *l, long cpu)
{
	return l->cpu == cpu;
}

static int fsock_local_of_task(struct fsock_el6_local *l, long task)
{
	return l->last_acceptor == (struct task_struct *)task;
}

/* A CPU went offline: the acceptors of its locals may wait elsewhere now. */
static int fsock_el6_cpu_event(struct notifier_block *nb, unsigned long action, void *hcpu)
{
	if ((action & ~CPU_TASKS_FROZEN) == CPU_DEAD)
		fsock_wake_globals(fsock_local_on_cpu, (long)hcpu);
	return NOTIFY_OK;
}

static struct notifier_block fsock_el6_cpu_nb = {
	.notifier_call = fsock_el6_cpu_event,
};

/* Once the exited acceptor's files (its epoll sets) are closed, its locals have no
 * waiter left and the global's waiters take their connections: wake them. */
static void fsock_el6_exited_work(struct work_struct *work)
{
	struct fsock_el6_exited *e = container_of(to_delayed_work(work),
						  struct fsock_el6_exited, work);

	if (!e->task->exit_state && ++e->tries < 100) {
		queue_delayed_work(fsock_wq, &e->work, HZ / 50);
		return;
	}
	fsock_wake_globals(fsock_local_of_task, (long)e->task);
	put_task_struct(e->task);
	kfree(e);
	atomic_dec(&fsock_exited_pending);
}

static int fsock_el6_task_exit(struct notifier_block *nb, unsigned long action, void *data)
{
	struct task_struct *task = data;
	struct fsock_el6_exited *e;
	struct fsock_el6_group *g;
	struct fsock_el6_local *l;
	int cpu, found = 0;

	rcu_read_lock();
	list_for_each_entry_rcu(g, &fsock_groups, node)
		for (cpu = 0; cpu < nr_cpu_ids; cpu++) {
			l = rcu_dereference(g->local[cpu]);
			if (l && l->acceptor == task) {
				l->acceptor = NULL;
				l->last_acceptor = task;
				found = 1;
			}
		}
	rcu_read_unlock();
	if (!found)
		return NOTIFY_OK;
	e = kzalloc(sizeof(*e), GFP_KERNEL);
	if (!e)
		return NOTIFY_OK;	/* the next connection on that CPU wakes the global */
	get_task_struct(task);
	e->task = task;
	atomic_inc(&fsock_exited_pending);
	INIT_DELAYED_WORK(&e->work, fsock_el6_exited_work);
	queue_delayed_work(fsock_wq, &e->work, HZ / 50);
	return NOTIFY_OK;
}

static struct notifier_block fsock_el6_exit_nb = {
	.notifier_call = fsock_el6_task_exit,
};

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
#define fsock_sock_create_lite	fastsocket_sock_create_lite	/* off the global VFS locks */
#define fsock_sock_create	fastsocket_sock_create
#else	/* a kernel without patch 0005: ordinary socket files */
#define fsock_sock_create_lite	sock_create_lite
#define fsock_sock_create	sock_create
#endif

/*
 * accept(2) of `usock` (the fd the caller passed) taking a connection from `lsock`
 * (usock itself or one of its locals): the same LSM check, against the caller's
 * socket, which also gives the new socket its label.
 */
static int fsock_kernel_accept(struct socket *usock, struct socket *lsock,
			       struct socket **newsock, int flags)
{
	struct sock *sk = lsock->sk;
	int err;

	err = fsock_sock_create_lite(sk->sk_family, sk->sk_type, sk->sk_protocol, newsock);
	if (err < 0)
		return err;
	err = security_socket_accept(usock, *newsock);
	if (!err)
		err = lsock->ops->accept(lsock, *newsock, flags);
	if (err < 0) {
		sock_release(*newsock);
		*newsock = NULL;
		return err;
	}
	(*newsock)->ops = &inet_stream_ops;	/* never the global's copy */
	return 0;
}

/* One non-blocking accept on a listen socket; the new socket gets an fd. */
static int fsock_accept_one(struct socket *usock, struct socket *lsock, int flags,
			    struct sockaddr __user *uaddr, int __user *uaddrlen)
{
	struct socket *newsock;
	int err, fd;

	err = fsock_kernel_accept(usock, lsock, &newsock, O_NONBLOCK);
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
	err = security_socket_listen(sock, backlog);	/* as listen(2) */
	if (!err)
		err = kernel_listen(sock, backlog);
	sockfd_put(sock);
	return err;
}

/* The global's TCP MD5 keys (TCP_MD5SIG) sign the local's handshakes too. */
static int fsock_copy_md5(struct sock *sk, struct sock *global)
{
#ifdef CONFIG_TCP_MD5SIG
	struct tcp_md5sig_info *info = tcp_sk(global)->md5sig_info;
	u8 *key;
	int i, err;

	for (i = 0; info && i < info->entries4; i++) {
		key = kmemdup(info->keys4[i].base.key, info->keys4[i].base.keylen,
			      GFP_KERNEL);
		if (!key)
			return -ENOMEM;
		err = tcp_v4_md5_do_add(sk, info->keys4[i].addr, key,
					info->keys4[i].base.keylen);
		if (err)
			return err;
	}
#endif
	return 0;
}

/*
 * TCP-level options children inherit (the kernel copies socket- and IP-level ones in
 * inet_csk_listen_local): TCP_NODELAY/CORK, keepalive, TCP_LINGER2, window clamp,
 * TCP_MAXSEG, TCP_SYNCNT, thin streams, congestion control, MD5 keys.  Global locked.
 */
static int fsock_copy_tcp_options(struct sock *sk, struct sock *global)
{
	struct tcp_sock *tp = tcp_sk(sk), *gtp = tcp_sk(global);
	struct inet_connection_sock *icsk = inet_csk(sk), *gicsk = inet_csk(global);

	tp->nonagle = gtp->nonagle;
	tp->keepalive_time = gtp->keepalive_time;
	tp->keepalive_intvl = gtp->keepalive_intvl;
	tp->keepalive_probes = gtp->keepalive_probes;
	tp->linger2 = gtp->linger2;
	tp->window_clamp = gtp->window_clamp;
	tp->rx_opt.user_mss = gtp->rx_opt.user_mss;
	tp->thin_lto = gtp->thin_lto;
	tp->thin_dupack = gtp->thin_dupack;
	icsk->icsk_syn_retries = gicsk->icsk_syn_retries;
	if (gicsk->icsk_ca_ops != icsk->icsk_ca_ops &&
	    try_module_get(gicsk->icsk_ca_ops->owner)) {
		module_put(icsk->icsk_ca_ops->owner);
		icsk->icsk_ca_ops = gicsk->icsk_ca_ops;
	}
	return fsock_copy_md5(sk, global);
}

/*
 * A local is what socket() + bind(global's address) + listen() would make: the caller
 * creates it (kern = 0: its credentials and LSM label) and passes their LSM checks.
 */
static int fsock_local_create(struct socket *gsock, struct socket **res)
{
	struct sock *global = gsock->sk;
	struct sockaddr_storage addr;
	struct socket *sock;
	int len, err;

	err = __sock_create(sock_net(global), AF_INET, SOCK_STREAM, IPPROTO_TCP, &sock, 0);
	if (err < 0)
		return err;
	err = kernel_getsockname(gsock, (struct sockaddr *)&addr, &len);
	if (!err)
		err = security_socket_bind(sock, (struct sockaddr *)&addr, len);
	if (!err)
		err = security_socket_listen(sock, global->sk_max_ack_backlog);
	if (!err) {
		lock_sock(global);
		err = fsock_copy_tcp_options(sock->sk, global);
		release_sock(global);
	}
	if (err) {
		sock_release(sock);
		return err;
	}
	*res = sock;
	return 0;
}

/* The global's release must free its locals: give it our ops (once). */
static int fsock_adopt_global(struct socket *sock)
{
	if (sock->ops == &fsock_el6_global_ops)
		return 0;
	if (sock->ops != &inet_stream_ops)
		return -EOPNOTSUPP;
	__module_get(THIS_MODULE);	/* put by sock_release() with our ops */
	sock->ops = &fsock_el6_global_ops;
	return 0;
}

/*
 * The caller becomes the acceptor of the local of `cpu`, and of no other; RCU.  When
 * it leaves another CPU's local (re-pinned), wake the global's waiters: connections
 * already queued there are reported to them now (fsock_el6_global_poll), not only
 * when the next one arrives on that CPU.
 */
static void fsock_set_acceptor(struct fsock_el6_group *g, int cpu)
{
	struct fsock_el6_local *l;
	int c, left = 0;

	for (c = 0; c < nr_cpu_ids; c++) {
		l = rcu_dereference(g->local[c]);
		if (l && l->acceptor == current && c != cpu) {
			l->acceptor = NULL;
			left = 1;
		}
	}
	l = rcu_dereference(g->local[cpu]);
	if (l)
		l->acceptor = current;
	if (left) {
		local_bh_disable();	/* sk_data_ready runs in softirq context otherwise */
		g->global->sk_data_ready(g->global, 0);
		local_bh_enable();
	}
}

/* Create the local listener of `sock` (a TCP/IPv4 listener) for `cpu`; mutex held. */
static int fsock_el6_spawn_locked(struct socket *sock, int cpu)
{
	struct sock *global = sock->sk;
	struct fsock_el6_group *g, *fresh = NULL;
	struct fsock_el6_local *l;
	int err, alive;

	if (!fsock_is_tcp4(sock))
		return -EOPNOTSUPP;
	if (global->sk_state != TCP_LISTEN || sock_flag(global, SOCK_FASTSOCKET_LOCAL))
		return -EINVAL;
	rcu_read_lock();
	g = fsock_group_find(global);
	if (g && g->local[cpu]) {
		fsock_set_acceptor(g, cpu);	/* idempotent per CPU */
		rcu_read_unlock();
		return 0;
	}
	rcu_read_unlock();
	err = fsock_adopt_global(sock);
	if (err)
		return err;

	l = kzalloc(sizeof(*l), GFP_KERNEL);
	if (!l)
		return -ENOMEM;
	atomic_set(&l->users, 1);
	l->cpu = cpu;
	l->global = global;
	INIT_LIST_HEAD(&l->node);
	INIT_WORK(&l->stop, fsock_local_stop_work);
	INIT_WORK(&l->release, fsock_local_release_work);
	err = fsock_local_create(sock, &l->sock);
	if (err < 0)
		goto out_free;

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
	if (alive && !err) {
		rcu_assign_pointer(g->local[cpu], l);
		list_add_tail(&l->node, &fsock_locals);
	} else if (alive && fresh)
		list_del_rcu(&g->node);		/* ours alone: nothing was spawned */
	else
		fresh = NULL;			/* in use, or the hook owns its teardown */
	/* Before the unlock: once it is dropped the hook may tear the group down (call_rcu) */
	rcu_read_lock();
	spin_unlock_bh(&fsock_groups_lock);
	if (!err && alive) {
		fsock_set_acceptor(g, cpu);
		rcu_read_unlock();
		fsock_dbg(1, "local listener for cpu %d of %p\n", cpu, global);
		return 0;
	}
	rcu_read_unlock();
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
	/* The new socket gets inet_stream_ops (fsock_kernel_accept): IPv4 TCP only. Any other
	 * listener (unix, IPv6) would be accepted and then released as an inet socket. */
	err = -EOPNOTSUPP;
	if (!fsock_is_tcp4(sock))
		goto out;
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
		err = fsock_accept_one(sock, sock, flags, uaddr, uaddrlen);
		if (err >= 0)
			fsock_stat_inc(FSOCK_STAT_GLOBAL_ACCEPT);
		goto out;
	}
	/* While the global queue has connections, take it every other time. */
	global_first = !reqsk_queue_empty(&inet_csk(sock->sk)->icsk_accept_queue) &&
		       (l->turn++ & 1);
	if (!global_first) {
		err = fsock_accept_one(sock, l->sock, flags, uaddr, uaddrlen);
		if (err >= 0) {
			fsock_stat_inc(FSOCK_STAT_LOCAL_ACCEPT);
			goto out_local;
		}
		if (err != -EAGAIN)
			goto out_local;
	}
	err = fsock_accept_one(sock, sock, flags, uaddr, uaddrlen);
	if (err >= 0) {
		fsock_stat_inc(FSOCK_STAT_GLOBAL_ACCEPT);
	} else if (err == -EAGAIN && global_first) {
		err = fsock_accept_one(sock, l->sock, flags, uaddr, uaddrlen);
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
	err = security_socket_shutdown(sock, how);	/* as shutdown(2) */
	if (!err)
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
	fsock_el6_global_ops = inet_stream_ops;
	fsock_el6_global_ops.owner = THIS_MODULE;
	fsock_el6_global_ops.release = fsock_el6_global_release;
	fsock_el6_global_ops.accept = fsock_el6_global_accept;
	fsock_el6_global_ops.poll = fsock_el6_global_poll;
	err = fastsocket_register_listen_stop(fsock_el6_listen_stop);
	if (err)
		goto out_wq;
	/* Without CONFIG_PROFILING (-ENOSYS) connections queued on a local when its
	 * acceptor exits wait for the next connection on that CPU to wake the global. */
	fsock_exit_nb_on = profile_event_register(PROFILE_TASK_EXIT, &fsock_el6_exit_nb) == 0;
	if (!fsock_exit_nb_on)
		pr_info(FSOCK_NAME ": no task exit notifier (CONFIG_PROFILING off)\n");
	err = register_hotcpu_notifier(&fsock_el6_cpu_nb);
	if (err)
		goto out_profile;
	return 0;
out_profile:
	if (fsock_exit_nb_on)
		profile_event_unregister(PROFILE_TASK_EXIT, &fsock_el6_exit_nb);
	fastsocket_unregister_listen_stop();
out_wq:
	destroy_workqueue(fsock_wq);
	return err;
}

static void fsock_el6_exit(void)
{
	struct fsock_el6_local *l, *tmp;
	struct fsock_el6_group *g;
	LIST_HEAD(gone);

	/* No hook runs after this; the kernel switches go back to off. */
	unregister_hotcpu_notifier(&fsock_el6_cpu_nb);
	if (fsock_exit_nb_on)
		profile_event_unregister(PROFILE_TASK_EXIT, &fsock_el6_exit_nb);
	fastsocket_unregister_listen_stop();
	while (atomic_read(&fsock_exited_pending))
		msleep(20);		/* exited-acceptor works: at most 2 s each */
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
	flush_workqueue(fsock_wq);	/* the stop works */
	spin_lock_bh(&fsock_groups_lock);
	list_splice_init(&fsock_locals, &gone);
	spin_unlock_bh(&fsock_groups_lock);
	list_for_each_entry_safe(l, tmp, &gone, node) {
		list_del(&l->node);
		fsock_local_put(l);
	}
	flush_workqueue(fsock_wq);
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
