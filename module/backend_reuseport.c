// SPDX-License-Identifier: GPL-2.0
/*
 * Fastsocket backend for stock kernels (>= 5.9): listen spawn on SO_REUSEPORT.
 *
 * A "global" listen socket (LISTEN ioctl) gets a group: per CPU at most one "local" listen
 * socket, a SO_REUSEPORT sibling bound to the same address. A classic BPF program on the
 * reuseport group sends each SYN to the local socket of the CPU that received it, or to
 * the global socket when that CPU has none. Workers accept local first, then global.
 *
 * Lifetime: global and local sockets get a module copy of their proto_ops (owner =
 * THIS_MODULE: each holds a module reference through the socket layer, so unload waits
 * for them). Its release hook removes the socket from its group; nothing else holds a
 * socket, so closing fds is all it takes to free everything.
 *
 * Locking: fsock_lock (mutex) serialises every change of the groups and the BPF
 * regeneration; ACCEPT and poll read the groups under RCU.
 */
#include <linux/module.h>
#include <linux/version.h>
#include <linux/net.h>
#include <linux/file.h>
#include <linux/fdtable.h>
#include <linux/filter.h>
#include <linux/hashtable.h>
#include <linux/mutex.h>
#include <linux/poll.h>
#include <linux/slab.h>
#include <linux/sockptr.h>
#include <linux/wait.h>
#include <net/sock.h>
#include <net/sock_reuseport.h>
#include <net/inet_connection_sock.h>
#include <net/ipv6.h>

#include "fastsocket_internal.h"

#if LINUX_VERSION_CODE < KERNEL_VERSION(5, 9, 0)
#error "backend_reuseport needs Linux >= 5.9 (sockptr_t); el6 kernels use backend_el6"
#endif

struct fsock_group;

/* One registered socket: the global (cpu == -1) or a local one. Key: sk. */
struct fsock_ent {
	struct hlist_node node;
	struct sock *sk;
	struct socket *sock;
	struct fsock_group *grp;
	int cpu;
	unsigned int turn;	/* local: next ACCEPT tries the global queue first */
	struct rcu_head rcu;
};

struct fsock_group {
	struct fsock_ent global;
	int nr_local;
	struct rcu_head rcu;
	struct fsock_ent __rcu *local[];	/* [nr_cpu_ids] */
};

/* Module copies of the original proto_ops (inet stream, inet6 stream). */
struct fsock_ops {
	const struct proto_ops *orig;
	struct proto_ops ops;
};

#define FSOCK_NR_OPS 4
static struct fsock_ops fsock_ops_tab[FSOCK_NR_OPS];

static DEFINE_MUTEX(fsock_lock);
static DEFINE_HASHTABLE(fsock_hash, 8);

static struct fsock_ent *fsock_find(const struct sock *sk)
{
	struct fsock_ent *e;

	hash_for_each_possible_rcu(fsock_hash, e, node, (unsigned long)sk)
		if (e->sk == sk)
			return e;
	return NULL;
}

static bool fsock_is_ours(const struct proto_ops *ops)
{
	return ops >= &fsock_ops_tab[0].ops && ops <= &fsock_ops_tab[FSOCK_NR_OPS - 1].ops;
}

static const struct proto_ops *fsock_orig(const struct proto_ops *ops)
{
	return container_of(ops, struct fsock_ops, ops)->orig;
}

/* ---- ops hooks ------------------------------------------------------------------- */

/* The local socket of `cpu` for global socket `sk` with a file reference, or NULL. */
static struct file *fsock_local_file(struct sock *sk, int cpu)
{
	struct file *file = NULL;
	struct fsock_ent *e, *l;

	rcu_read_lock();
	e = fsock_find(sk);
	if (e && e->cpu < 0 && cpu < nr_cpu_ids) {
		l = rcu_dereference(e->grp->local[cpu]);
		if (l) {
			/* Its release (which unlinks it) runs only after f_count hit 0. */
			file = READ_ONCE(l->sock->file);
			if (file && !get_file_rcu(file))
				file = NULL;
		}
	}
	rcu_read_unlock();
	return file;
}

/*
 * Readiness of a global socket includes the local socket of the CPU the waiter runs on,
 * so poll/epoll on the global fd wake for connections steered to the local queue. The
 * local's poll is given the local file: poll(2) then holds it while waiting, and epoll
 * entries on the local wait queue are removed by POLLFREE when the local goes away.
 */
static __poll_t fsock_poll(struct file *file, struct socket *sock, poll_table *wait)
{
	const struct proto_ops *orig = fsock_orig(sock->ops);
	__poll_t mask = orig->poll(file, sock, wait);
	struct file *lfile = fsock_local_file(sock->sk, raw_smp_processor_id());

	if (lfile) {
		struct socket *lsock = lfile->private_data;

		if (lsock && lsock->sk != sock->sk)
			mask |= orig->poll(lfile, lsock, wait) & (EPOLLIN | EPOLLRDNORM);
		fput(lfile);
	}
	return mask;
}

static int fsock_regen(struct fsock_group *g);

/* Called with fsock_lock held: unlink every socket of the group. */
static void fsock_group_teardown(struct fsock_group *g)
{
	int cpu;

	for (cpu = 0; cpu < nr_cpu_ids; cpu++) {
		struct fsock_ent *l = rcu_dereference_protected(g->local[cpu],
								lockdep_is_held(&fsock_lock));

		if (!l)
			continue;
		RCU_INIT_POINTER(g->local[cpu], NULL);
		hash_del_rcu(&l->node);
		/* Stop it listening: nobody can accept from it once the global is gone. */
		kernel_sock_shutdown(l->sock, SHUT_RDWR);
		kfree_rcu(l, rcu);
	}
	hash_del_rcu(&g->global.node);
	kfree_rcu(g, rcu);
}

static int fsock_release(struct socket *sock)
{
	const struct proto_ops *orig = fsock_orig(sock->ops);
	struct fsock_group *regen = NULL;
	struct fsock_ent *e;
	int err;

	mutex_lock(&fsock_lock);
	e = sock->sk ? fsock_find(sock->sk) : NULL;
	if (e && e->cpu < 0) {
		fsock_dbg(1, "global listen socket %p closed, %d local sockets shut down\n",
			  sock->sk, e->grp->nr_local);
		fsock_group_teardown(e->grp);
	} else if (e) {
		regen = e->grp;
		RCU_INIT_POINTER(regen->local[e->cpu], NULL);
		regen->nr_local--;
		hash_del_rcu(&e->node);
		/* Epoll items of the global fd may sit on this wait queue (fsock_poll). */
		wake_up_pollfree(&sock->wq.wait);
		fsock_dbg(1, "local listen socket of cpu %d closed\n", e->cpu);
		kfree_rcu(e, rcu);
	}
	err = orig->release(sock);	/* leaves the reuseport group */
	if (regen)
		fsock_regen(regen);
	mutex_unlock(&fsock_lock);
	return err;
}

/* Give `sock` our ops copy (and a module reference, dropped by __sock_release). */
static int fsock_take_ops(struct socket *sock)
{
	const struct proto_ops *orig = sock->ops;
	int i;

	if (fsock_is_ours(orig))
		return 0;
	for (i = 0; i < FSOCK_NR_OPS; i++) {
		struct fsock_ops *o = &fsock_ops_tab[i];

		if (!o->orig) {
			o->ops = *orig;
			o->ops.owner = THIS_MODULE;
			o->ops.poll = fsock_poll;
			o->ops.release = fsock_release;
			o->orig = orig;
		}
		if (o->orig == orig) {
			__module_get(THIS_MODULE);
			/* Pairs with the socket layer's module_put(sock->ops->owner). */
			module_put(orig->owner);
			WRITE_ONCE(sock->ops, &o->ops);
			return 0;
		}
	}
	return -EOPNOTSUPP;
}

/* Accepted sockets go back to the kernel's ops: no module cost after accept. */
static void fsock_drop_ops(struct socket *sock)
{
	const struct proto_ops *ops = sock->ops;

	if (!fsock_is_ours(ops))
		return;
	sock->ops = fsock_orig(ops);
	__module_get(sock->ops->owner);
	module_put(THIS_MODULE);
}

/* ---- steering program ------------------------------------------------------------ */

#define FSOCK_RET_HASH 0xffffffffu	/* out of range: kernel falls back to its hash */

/* Copy up to `max` socks of the global's reuseport group; returns the group size. */
static int fsock_snapshot(struct sock *gsk, struct sock **socks, int max)
{
	struct sock_reuseport *reuse;
	int n = -ENOENT;

	rcu_read_lock();
	reuse = rcu_dereference(gsk->sk_reuseport_cb);
	if (reuse) {
		n = READ_ONCE(reuse->num_socks);
		memcpy(socks, reuse->socks, min(n, max) * sizeof(*socks));
	}
	rcu_read_unlock();
	return n;
}

/*
 * Build and attach: ld #cpu; per spawned CPU c: jeq #c → ret #index(local c); else ret
 * #index(global) (or "hash" when the group also holds sockets that are not ours, so the
 * application's own SO_REUSEPORT sockets are not starved). Returns 1 if attached.
 */
static int fsock_attach(struct fsock_group *g, struct sock **socks, int n, int max)
{
	struct sock_filter *insns;
	struct sock_fprog_kern fprog;
	struct bpf_prog *prog;
	u32 dflt = FSOCK_RET_HASH;
	int i, cpu, len = 0, ours = 0, err;

	insns = kcalloc(2 * nr_cpu_ids + 2, sizeof(*insns), GFP_KERNEL);
	if (!insns)
		return -ENOMEM;
	insns[len++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
						    SKF_AD_OFF + SKF_AD_CPU);
	rcu_read_lock();
	for (i = 0; i < min(n, max); i++) {
		struct fsock_ent *e = fsock_find(socks[i]);

		if (!e || e->grp != g)
			continue;
		ours++;
		if (e->cpu < 0) {
			dflt = i;
			continue;
		}
		cpu = e->cpu;
		insns[len++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, cpu, 0, 1);
		insns[len++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, i);
	}
	rcu_read_unlock();
	if (ours != n)
		dflt = FSOCK_RET_HASH;
	insns[len++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, dflt);
	fprog.len = len;
	fprog.filter = insns;
	err = bpf_prog_create(&prog, &fprog);
	kfree(insns);
	if (err)
		return err;
	err = reuseport_attach_prog(g->global.sk, prog);
	if (err) {
		bpf_prog_destroy(prog);
		return err;
	}
	fsock_dbg(2, "steering program: %d sockets, %d locals, default %d\n",
		  n, g->nr_local, (int)dflt);
	return 0;
}

/*
 * Regenerate the group's program (fsock_lock held). The kernel's reuseport_lock is not
 * exported, so the indices are read from an RCU snapshot and the snapshot is compared
 * again after attaching: a change in between (a concurrent close) means regenerate.
 */
static int fsock_regen(struct fsock_group *g)
{
	int max = nr_cpu_ids + 64, tries, n, n2, err = 0;
	struct sock **a, **b;

	a = kmalloc_array(2 * max, sizeof(*a), GFP_KERNEL);
	if (!a)
		return -ENOMEM;
	b = a + max;
	for (tries = 0; tries < 5; tries++) {
		n = fsock_snapshot(g->global.sk, a, max);
		if (n < 0) {
			err = n;	/* the global is no longer in a group: nothing to steer */
			break;
		}
		err = fsock_attach(g, a, n, max);
		if (err)
			break;
		n2 = fsock_snapshot(g->global.sk, b, max);
		if (n2 == n && !memcmp(a, b, min(n, max) * sizeof(*a)))
			break;
	}
	kfree(a);
	if (err && err != -ENOENT)
		pr_warn(FSOCK_NAME ": steering program not attached: %d\n", err);
	return err;
}

/* ---- ioctl ops ------------------------------------------------------------------- */

static bool fsock_spawnable(const struct sock *sk)
{
	return (sk->sk_family == AF_INET || sk->sk_family == AF_INET6) &&
	       sk->sk_type == SOCK_STREAM && sk->sk_protocol == IPPROTO_TCP;
}

/* Install `sock` as a new fd of the caller (consumes `sock` on failure). */
static int fsock_install(struct socket *sock, int flags)
{
	struct file *file;
	int fd;

	fd = get_unused_fd_flags(flags & O_CLOEXEC);
	if (fd < 0) {
		sock_release(sock);
		return fd;
	}
	file = sock_alloc_file(sock, flags & O_NONBLOCK, NULL);
	if (IS_ERR(file)) {	/* sock_alloc_file released the socket */
		put_unused_fd(fd);
		return PTR_ERR(file);
	}
	fd_install(fd, file);
	return fd;
}

static int rp_socket(int family, int type, int protocol)
{
	int flags = type & ~SOCK_TYPE_MASK;
	struct socket *sock;
	int err;

	if (flags & ~(SOCK_CLOEXEC | SOCK_NONBLOCK))
		return -EINVAL;
	err = sock_create(family, type & SOCK_TYPE_MASK, protocol, &sock);
	if (err)
		return err;
	/* Local sockets join the global's reuseport group: it must have SO_REUSEPORT. */
	if (fsock_param(FSOCK_PARAM_LISTEN_SPAWN) && fsock_spawnable(sock->sk))
		sock_set_reuseport(sock->sk);
	return fsock_install(sock, flags);
}

/* Make the listening `sock` a global listen socket (fsock_lock held). */
static struct fsock_ent *fsock_register(struct socket *sock)
{
	struct fsock_ent *e = fsock_find(sock->sk);
	struct fsock_group *g;

	if (e)
		return e;
	if (!sock->sk->sk_reuseport || sock->sk->sk_state != TCP_LISTEN)
		return ERR_PTR(-EINVAL);
	g = kzalloc(struct_size(g, local, nr_cpu_ids), GFP_KERNEL);
	if (!g)
		return ERR_PTR(-ENOMEM);
	if (fsock_take_ops(sock)) {
		kfree(g);
		return ERR_PTR(-EOPNOTSUPP);
	}
	g->global.sk = sock->sk;
	g->global.sock = sock;
	g->global.grp = g;
	g->global.cpu = -1;
	hash_add_rcu(fsock_hash, &g->global.node, (unsigned long)sock->sk);
	return &g->global;
}

static int rp_listen(int fd, int backlog)
{
	struct socket *sock;
	struct sock *sk;
	int err, somaxconn;
	bool spawn;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	sk = sock->sk;
	somaxconn = READ_ONCE(sock_net(sk)->core.sysctl_somaxconn);
	if ((unsigned int)backlog > somaxconn)
		backlog = somaxconn;	/* as listen(2) */
	spawn = fsock_param(FSOCK_PARAM_LISTEN_SPAWN) && fsock_spawnable(sk);
	/* SO_REUSEPORT before listen: the group is formed when the socket is hashed. */
	if (spawn && !sk->sk_reuseport)
		sock_set_reuseport(sk);
	err = kernel_listen(sock, backlog);
	if (!err && spawn) {
		struct fsock_ent *e;

		mutex_lock(&fsock_lock);
		e = fsock_register(sock);
		mutex_unlock(&fsock_lock);
		if (IS_ERR(e))
			err = PTR_ERR(e);
	}
	sockfd_put(sock);
	return err;
}

/* A new listening sibling of the global for `cpu` (fsock_lock held). */
static struct socket *fsock_new_local(struct sock *gsk, struct socket *gsock, int cpu)
{
	struct sockaddr_storage addr;
	struct socket *lsock;
	int err, len;

	err = __sock_create(sock_net(gsk), gsk->sk_family, SOCK_STREAM, gsk->sk_protocol,
			    &lsock, 0);
	if (err)
		return ERR_PTR(err);
	sock_set_reuseport(lsock->sk);
	if (gsk->sk_family == AF_INET6 && gsk->sk_ipv6only)
		ip6_sock_set_v6only(lsock->sk);
	/* The kernel's hash fallback then prefers it on its CPU too. */
	err = sock_setsockopt(lsock, SOL_SOCKET, SO_INCOMING_CPU,
			      KERNEL_SOCKPTR(&cpu), sizeof(cpu));
	if (!err) {
		len = kernel_getsockname(gsock, (struct sockaddr *)&addr);
		err = len < 0 ? len : kernel_bind(lsock, (struct sockaddr *)&addr, len);
	}
	if (!err)
		err = kernel_listen(lsock, READ_ONCE(gsk->sk_max_ack_backlog));
	if (err) {
		sock_release(lsock);
		return ERR_PTR(err);
	}
	return lsock;
}

/* Spawn for `cpu` (fsock_lock held). *local_fd: new fd, or -1 with want_fd false. */
static int fsock_spawn_locked(struct socket *gsock, int cpu, bool want_fd, int *local_fd)
{
	struct fsock_ent *e, *l;
	struct socket *lsock;
	struct file *file;
	int fd;

	e = fsock_register(gsock);
	if (IS_ERR(e))
		return PTR_ERR(e);
	if (e->cpu >= 0)
		return -EINVAL;		/* a local socket is not a global one */
	*local_fd = -1;
	l = rcu_dereference_protected(e->grp->local[cpu], lockdep_is_held(&fsock_lock));
	if (l) {
		/* Idempotent: hand out the existing local socket. */
		if (!want_fd)
			return 0;
		fd = get_unused_fd_flags(O_CLOEXEC);
		if (fd < 0)
			return fd;
		file = l->sock->file;
		get_file(file);
		fd_install(fd, file);
		*local_fd = fd;
		return 0;
	}
	l = kzalloc(sizeof(*l), GFP_KERNEL);
	if (!l)
		return -ENOMEM;
	lsock = fsock_new_local(gsock->sk, gsock, cpu);
	if (IS_ERR(lsock)) {
		kfree(l);
		return PTR_ERR(lsock);
	}
	/* File first: its failure paths release the socket while it has the kernel's ops. */
	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		sock_release(lsock);
		kfree(l);
		return fd;
	}
	file = sock_alloc_file(lsock, 0, NULL);
	if (IS_ERR(file)) {
		put_unused_fd(fd);
		kfree(l);
		return PTR_ERR(file);
	}
	if (fsock_take_ops(lsock))	/* same ops as the global: cannot fail */
		WARN_ON_ONCE(1);
	l->sk = lsock->sk;
	l->sock = lsock;
	l->grp = e->grp;
	l->cpu = cpu;
	hash_add_rcu(fsock_hash, &l->node, (unsigned long)l->sk);
	rcu_assign_pointer(e->grp->local[cpu], l);
	e->grp->nr_local++;
	fsock_regen(e->grp);
	/* The caller owns the local socket through this fd (SPAWN_ALL: only through the
	 * fd too; the number is not reported, it is close-on-exec). */
	fd_install(fd, file);
	*local_fd = want_fd ? fd : -1;
	return 0;
}

static int rp_spawn(int fd, int cpu, int *local_fd)
{
	struct socket *gsock;
	int err;

	gsock = sockfd_lookup(fd, &err);
	if (!gsock)
		return err;
	if (!fsock_spawnable(gsock->sk)) {
		sockfd_put(gsock);
		return -EOPNOTSUPP;
	}
	mutex_lock(&fsock_lock);
	err = fsock_spawn_locked(gsock, cpu, true, local_fd);
	mutex_unlock(&fsock_lock);
	sockfd_put(gsock);
	return err;
}

#define FSOCK_SPAWN_ALL_MAX 64

struct fsock_collect {
	int n;
	struct file *files[FSOCK_SPAWN_ALL_MAX];
};

/* iterate_fd() callback (under the fd table lock): collect global listen sockets. */
static int fsock_collect_global(const void *arg, struct file *file, unsigned int fd)
{
	struct fsock_collect *c = (struct fsock_collect *)arg;
	struct socket *sock = sock_from_file(file);
	struct fsock_ent *e;

	if (!sock || !sock->sk || !fsock_is_ours(READ_ONCE(sock->ops)))
		return 0;
	rcu_read_lock();
	e = fsock_find(sock->sk);
	if (e && e->cpu < 0 && c->n < FSOCK_SPAWN_ALL_MAX && get_file_rcu(file))
		c->files[c->n++] = file;
	rcu_read_unlock();
	return 0;
}

static int rp_spawn_all(int cpu)
{
	struct fsock_collect *c;
	int i, done = 0, err = 0, local_fd;

	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	iterate_fd(current->files, 0, fsock_collect_global, c);
	mutex_lock(&fsock_lock);
	for (i = 0; i < c->n; i++) {
		struct socket *gsock = sock_from_file(c->files[i]);
		struct fsock_ent *e = fsock_find(gsock->sk);
		bool had = e && rcu_access_pointer(e->grp->local[cpu]);

		if (!err && !had) {
			err = fsock_spawn_locked(gsock, cpu, false, &local_fd);
			done += !err;
		}
	}
	mutex_unlock(&fsock_lock);
	for (i = 0; i < c->n; i++)
		fput(c->files[i]);
	kfree(c);
	return err ? err : done;
}

/* Non-blocking accept on `sock`: a new fd, -EAGAIN, or -errno. */
static int fsock_accept_one(struct socket *sock, int cpu, int flags,
			    struct sockaddr __user *uaddr, int __user *uaddrlen)
{
	struct sockaddr_storage addr;
	struct socket *newsock;
	struct file *file;
	int err, fd, len, ulen;

	err = kernel_accept(sock, &newsock, O_NONBLOCK);
	if (err)
		return err;
	fsock_drop_ops(newsock);
	if (READ_ONCE(newsock->sk->sk_incoming_cpu) == cpu)
		fsock_stat_inc(FSOCK_STAT_STEERED);
	if (uaddr) {
		len = newsock->ops->getname(newsock, (struct sockaddr *)&addr, 2);
		err = len < 0 ? len : 0;
		if (!err && get_user(ulen, uaddrlen))
			err = -EFAULT;
		if (!err && ulen < 0)
			err = -EINVAL;
		if (!err && copy_to_user(uaddr, &addr, min(len, ulen)))
			err = -EFAULT;
		if (!err && put_user(len, uaddrlen))
			err = -EFAULT;
		if (err) {
			sock_release(newsock);
			return err;
		}
	}
	fd = get_unused_fd_flags(flags & O_CLOEXEC);
	if (fd < 0) {
		sock_release(newsock);
		return fd;
	}
	file = sock_alloc_file(newsock, flags & O_NONBLOCK, NULL);
	if (IS_ERR(file)) {
		put_unused_fd(fd);
		return PTR_ERR(file);
	}
	fd_install(fd, file);
	return fd;
}

static int rp_accept(int fd, int cpu, int flags, struct sockaddr __user *uaddr,
		     int __user *uaddrlen)
{
	struct socket *gsock, *lsock = NULL;
	struct file *lfile;
	struct fsock_ent *l = NULL;
	bool global_first = false;
	int err, i;

	gsock = sockfd_lookup(fd, &err);
	if (!gsock)
		return err;
	lfile = fsock_local_file(gsock->sk, cpu);
	if (lfile) {
		lsock = lfile->private_data;
		rcu_read_lock();
		l = fsock_find(lsock->sk);
		/* Alternate while the global queue has connections so it is not starved. */
		global_first = l && l->turn &&
			!reqsk_queue_empty(&inet_csk(gsock->sk)->icsk_accept_queue);
		rcu_read_unlock();
	}
	/* Probe order: local then global, or the reverse on alternation; global only
	 * when this CPU has no local socket. */
	err = -EAGAIN;
	for (i = 0; i < (lsock ? 2 : 1) && err == -EAGAIN; i++) {
		bool local = lsock && (i == 0) != global_first;

		if (local) {
			fsock_stat_inc(FSOCK_STAT_LOCAL_LOOKUP);
			err = fsock_accept_one(lsock, cpu, flags, uaddr, uaddrlen);
			if (err >= 0)
				fsock_stat_inc(FSOCK_STAT_LOCAL_ACCEPT);
		} else {
			fsock_stat_inc(FSOCK_STAT_GLOBAL_LOOKUP);
			err = fsock_accept_one(gsock, cpu, flags, uaddr, uaddrlen);
			if (err >= 0)
				fsock_stat_inc(FSOCK_STAT_GLOBAL_ACCEPT);
		}
		if (err >= 0 && lsock) {
			rcu_read_lock();
			l = fsock_find(lsock->sk);
			if (l)
				WRITE_ONCE(l->turn, local);
			rcu_read_unlock();
		}
	}
	if (lfile)
		fput(lfile);
	sockfd_put(gsock);
	return err;
}

struct fsock_locals {
	struct fsock_group *grp;
	int n;
	int fds[FSOCK_SPAWN_ALL_MAX];
	struct file *files[FSOCK_SPAWN_ALL_MAX];
};

/* iterate_fd() callback: the caller's fds of local sockets of one group. */
static int fsock_collect_local(const void *arg, struct file *file, unsigned int fd)
{
	struct fsock_locals *c = (struct fsock_locals *)arg;
	struct socket *sock = sock_from_file(file);
	struct fsock_ent *e;

	if (!sock || !sock->sk || !fsock_is_ours(READ_ONCE(sock->ops)))
		return 0;
	rcu_read_lock();
	e = fsock_find(sock->sk);
	if (e && e->cpu >= 0 && e->grp == c->grp && c->n < FSOCK_SPAWN_ALL_MAX &&
	    get_file_rcu(file)) {
		c->fds[c->n] = fd;
		c->files[c->n++] = file;
	}
	rcu_read_unlock();
	return 0;
}

/*
 * CLOSE of a global listen socket also closes the caller's fds of its local sockets (the
 * ones SPAWN returned and the unreported ones of SPAWN_ALL): the process is done with
 * that listener, and a forgotten local fd would keep receiving connections.
 */
static int rp_close(int fd)
{
	struct fsock_locals *c = NULL;
	struct socket *sock;
	struct fsock_ent *e;
	int i, err;

	sock = sockfd_lookup(fd, &err);
	if (sock && fsock_is_ours(READ_ONCE(sock->ops))) {
		rcu_read_lock();
		e = fsock_find(sock->sk);
		if (e && e->cpu < 0)
			c = kzalloc(sizeof(*c), GFP_ATOMIC);
		if (c)
			c->grp = e->grp;
		rcu_read_unlock();
		/* c->grp is only compared, never dereferenced, by the callback. */
		if (c)
			iterate_fd(current->files, 0, fsock_collect_local, c);
	}
	if (sock)
		sockfd_put(sock);
	err = close_fd(fd);
	for (i = 0; c && i < c->n; i++) {
		bool same;

		/* Another thread may have closed and reused the number meanwhile. */
		rcu_read_lock();
		same = lookup_fd_rcu(c->fds[i]) == c->files[i];
		rcu_read_unlock();
		if (same)
			close_fd(c->fds[i]);
		fput(c->files[i]);
	}
	kfree(c);
	return err;
}

static int rp_shutdown(int fd, int how)
{
	struct socket *sock;
	struct fsock_ent *e;
	int err, cpu;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	err = kernel_sock_shutdown(sock, how);
	/* A global that stops listening takes its local sockets with it. */
	if (!err && how != SHUT_WR) {
		mutex_lock(&fsock_lock);
		e = fsock_find(sock->sk);
		if (e && e->cpu < 0)
			for (cpu = 0; cpu < nr_cpu_ids; cpu++) {
				struct fsock_ent *l = rcu_dereference_protected(
					e->grp->local[cpu], lockdep_is_held(&fsock_lock));

				if (l)
					kernel_sock_shutdown(l->sock, how);
			}
		mutex_unlock(&fsock_lock);
	}
	sockfd_put(sock);
	return err;
}

static int rp_init(void)
{
	return 0;
}

static void rp_exit(void)
{
	/* Every registered socket held a module reference, so the table is empty here;
	 * wait for the kfree_rcu() of the last unlinked entries. */
	WARN_ON(!hash_empty(fsock_hash));
	rcu_barrier();
}

const struct fsock_backend fsock_backend = {
	.name		= "reuseport",
	.features	= FSOCK_FEAT_LISTEN_SPAWN | FSOCK_FEAT_REUSEPORT,
	.init		= rp_init,
	.exit		= rp_exit,
	.socket		= rp_socket,
	.listen		= rp_listen,
	.spawn		= rp_spawn,
	.spawn_all	= rp_spawn_all,
	.accept		= rp_accept,
	.close		= rp_close,
	.shutdown	= rp_shutdown,
};
