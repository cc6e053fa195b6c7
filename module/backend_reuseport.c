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
 * socket, so closing fds is all it takes to free everything. A local that goes away
 * (closed, its worker exited, CLOSE of the global) first hands its queued connections to
 * the global socket: worker churn loses none.
 *
 * A worker re-pinned to another CPU keeps its local (and its epoll entry on it), so the
 * SYNs of the CPU it left still reach that local and wake only that worker: ACCEPT and
 * the global's poll take the caller's own locals of other CPUs (and locals whose owner
 * is gone or whose CPU went offline) after the current CPU's and the global's queues.
 * Nothing waits for an acceptor that no longer runs there, and nobody else is woken.
 *
 * Locals are created, bound and put to listen with the credentials of whoever opened the
 * global socket (a root master, unprivileged workers) and inherit its options.
 *
 * Locking: fsock_lock (mutex) serialises every change of the groups and the BPF
 * regeneration, and is taken before any socket lock; ACCEPT and poll read the groups
 * under RCU.
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
#include <linux/cred.h>
#include <linux/pid.h>
#include <linux/pid_namespace.h>
#include <linux/tcp.h>
#include <net/sock.h>
#include <net/sock_reuseport.h>
#include <net/inet_connection_sock.h>
#include <net/ipv6.h>
#include <net/tcp.h>

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
	pid_t owner;		/* local: process (tgid) that last SPAWNed it (initial pid namespace) */
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
static bool fsock_steer = true;		/* enable_listen_spawn != 0 (fsock_lock) */
static struct sock *fsock_retiring;	/* local being retired: ours, not steered to */

/* Caller holds rcu_read_lock() or fsock_lock. */
static struct fsock_ent *fsock_find(const struct sock *sk)
{
	struct fsock_ent *e;

	hash_for_each_possible_rcu(fsock_hash, e, node, (unsigned long)sk,
				   lockdep_is_held(&fsock_lock))
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

/* A file reference to local `l` (RCU held), or NULL when its last fd is being closed. */
static struct file *fsock_ent_file(struct fsock_ent *l)
{
	/* Its release (which unlinks it) runs only after f_count hit 0. */
	struct file *file = READ_ONCE(l->sock->file);

	return file && get_file_rcu(file) ? file : NULL;
}

/* The local socket of `cpu` for global socket `sk` with a file reference, or NULL. */
static struct file *fsock_local_file(struct sock *sk, int cpu)
{
	struct file *file = NULL;
	struct fsock_ent *e, *l;

	rcu_read_lock();
	e = fsock_find(sk);
	if (e && e->cpu < 0 && cpu < nr_cpu_ids) {
		l = rcu_dereference(e->grp->local[cpu]);
		if (l)
			file = fsock_ent_file(l);
	}
	rcu_read_unlock();
	return file;
}

/*
 * Whether the owner of local `l` can no longer drain it where it is: the process is gone
 * (another process still holds the fd) or the local's CPU went offline. Such a local's
 * connections are anybody's. RCU held (find_pid_ns).
 */
static bool fsock_abandoned(const struct fsock_ent *l)
{
	if (!cpu_online(l->cpu))
		return true;
	return !pid_task(find_pid_ns(READ_ONCE(l->owner), &init_pid_ns), PIDTYPE_TGID);
}

/*
 * The next local of the global's group after CPU `*cpu` that the caller may drain from
 * another CPU (its own, e.g. after a re-pin, or an abandoned one), skipping `skip`
 * (the caller's CPU) and, with `queued`, empty ones. A file reference, or NULL at the end.
 */
static struct file *fsock_next_adoptable(struct sock *gsk, int *cpu, int skip, bool queued)
{
	pid_t me = task_tgid_nr(current);	/* any thread: a process spawns once per listener */
	struct file *file = NULL;
	struct fsock_ent *e, *l;

	rcu_read_lock();
	e = fsock_find(gsk);
	while (e && e->cpu < 0 && !file && ++*cpu < nr_cpu_ids) {
		l = rcu_dereference(e->grp->local[*cpu]);
		if (!l || *cpu == skip)
			continue;
		if (queued && reqsk_queue_empty(&inet_csk(l->sk)->icsk_accept_queue))
			continue;
		if (READ_ONCE(l->owner) == me || fsock_abandoned(l))
			file = fsock_ent_file(l);
	}
	rcu_read_unlock();
	return file;
}

/* Readiness (EPOLLIN) of a local's queue for a poll of the global. */
static __poll_t fsock_local_poll(const struct proto_ops *orig, struct file *lfile,
				 struct sock *gsk, poll_table *wait)
{
	struct socket *lsock = lfile->private_data;
	__poll_t mask = 0;

	if (lsock && lsock->sk != gsk)
		mask = orig->poll(lfile, lsock, wait) & (EPOLLIN | EPOLLRDNORM);
	fput(lfile);
	return mask;
}

/*
 * Readiness of a global socket includes the local socket of the CPU the waiter runs on,
 * so poll/epoll on the global fd wake for connections steered to the local queue. The
 * local's poll is given the local file: poll(2) then holds it while waiting, and epoll
 * entries on the local wait queue are removed by POLLFREE when the local goes away.
 * It also includes the locals the waiter may drain from here (fsock_next_adoptable):
 * a re-pinned worker is still woken by its old CPU's local and must see why; a poll(2)
 * of it waits on them too. Abandoned locals are waited on by every poller: rare (an
 * owner gone while another process holds the fd), and better woken than stranded.
 */
static __poll_t fsock_poll(struct file *file, struct socket *sock, poll_table *wait)
{
	const struct proto_ops *orig = fsock_orig(sock->ops);
	__poll_t mask = orig->poll(file, sock, wait);
	int here = raw_smp_processor_id(), cpu = -1;
	struct file *lfile = fsock_local_file(sock->sk, here);

	if (lfile)
		mask |= fsock_local_poll(orig, lfile, sock->sk, wait);
	/* Already readable and nothing to register: no need to look further. */
	if ((mask & EPOLLIN) && poll_does_not_wait(wait))
		return mask;
	while ((lfile = fsock_next_adoptable(sock->sk, &cpu, here, false)))
		mask |= fsock_local_poll(orig, lfile, sock->sk, wait);
	return mask;
}

static int fsock_regen(struct fsock_group *g);

/*
 * Shut down one of our sockets from inside (fsock_lock held): the kernel's op, not our
 * hook, which would take fsock_lock again.
 */
static void fsock_stop(struct socket *sock, int how)
{
	fsock_orig(sock->ops)->shutdown(sock, how);
}

/*
 * Move the connections queued on local `lsk` to the global `gsk` (whose workers accept
 * them) instead of letting the local's close reset them. Fast Open requests stay: their
 * accounting belongs to the listener that made them (tcp_close then handles them).
 */
static void fsock_drain(struct sock *lsk, struct sock *gsk)
{
	struct request_sock_queue *q = &inet_csk(lsk)->icsk_accept_queue;
	int n = READ_ONCE(lsk->sk_ack_backlog), moved = 0;
	struct request_sock *req;

	if (lsk->sk_state != TCP_LISTEN)
		return;
	while (n-- > 0 && (req = reqsk_queue_remove(q, lsk))) {
		struct sock *child = req->sk;
		struct sock *to = tcp_rsk(req)->tfo_listener ? lsk : gsk;

		local_bh_disable();
		bh_lock_sock(child);
		sock_hold(child);
		/* Not listening any more: the child is reset, as the local's close would. */
		if (inet_csk_reqsk_queue_add(to, req, child))
			moved += to == gsk;
		else
			reqsk_put(req);
		bh_unlock_sock(child);
		local_bh_enable();
		sock_put(child);
	}
	if (moved) {
		gsk->sk_data_ready(gsk);
		fsock_dbg(2, "%d queued connections moved to the global socket\n", moved);
	}
}

/*
 * Take local `l` out of its group (fsock_lock held) before it stops listening: no more
 * steering to it, its queue goes to the global socket. The caller then closes or shuts
 * it down and regenerates the program again (the kernel compacts the group then).
 */
static void fsock_retire(struct fsock_ent *l)
{
	struct fsock_group *g = l->grp;

	if (rcu_access_pointer(g->local[l->cpu]) == l) {
		RCU_INIT_POINTER(g->local[l->cpu], NULL);
		g->nr_local--;
	}
	hash_del_rcu(&l->node);
	fsock_retiring = l->sk;
	fsock_regen(g);		/* SYNs of its CPU now go to the global socket */
	fsock_retiring = NULL;
	fsock_drain(l->sk, g->global.sk);
	kfree_rcu(l, rcu);
}

/* Called with fsock_lock held: unlink every socket of the group (a local whose file is
 * already going away may be in the table without being the group's local any more).
 */
static void fsock_group_teardown(struct fsock_group *g)
{
	struct fsock_ent *l;
	struct hlist_node *tmp;
	int bkt;

	hash_for_each_safe(fsock_hash, bkt, tmp, l, node) {
		if (l->grp != g || l == &g->global)
			continue;
		hash_del_rcu(&l->node);
		/* Stop it listening: nobody can accept from it once the global is gone. */
		fsock_stop(l->sock, SHUT_RDWR);
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
	bool global;
	int err;

	mutex_lock(&fsock_lock);
	e = sock->sk ? fsock_find(sock->sk) : NULL;
	global = e && e->cpu < 0;
	if (global) {
		fsock_dbg(1, "global listen socket %p closed, %d local sockets shut down\n",
			  sock->sk, e->grp->nr_local);
		fsock_group_teardown(e->grp);
	} else if (e) {
		regen = e->grp;
		fsock_dbg(1, "local listen socket of cpu %d closed\n", e->cpu);
		fsock_retire(e);
	}
	/* Epoll items of a global fd may sit on a local's wait queue (fsock_poll). */
	if (!global)
		wake_up_pollfree(&sock->wq.wait);
	err = orig->release(sock);	/* leaves the reuseport group */
	if (regen)
		fsock_regen(regen);	/* the kernel compacted the group's socket array */
	mutex_unlock(&fsock_lock);
	return err;
}

/* After anything that may take a socket out of its reuseport group: re-steer. */
static void fsock_resync(struct sock *sk)
{
	struct fsock_ent *e;

	mutex_lock(&fsock_lock);
	e = fsock_find(sk);
	if (e)
		fsock_regen(e->grp);
	mutex_unlock(&fsock_lock);
}

/*
 * shutdown(2) or SHUTDOWN of one of our listeners (how is SHUT_*). Receive shutdown
 * stops a listener: a local is first retired (its queue goes to the global); a global
 * takes its locals with it. Then the group is re-steered.
 */
static int fsock_shutdown_op(struct socket *sock, int how)
{
	const struct proto_ops *orig = fsock_orig(sock->ops);
	struct fsock_group *g;
	struct fsock_ent *e;
	bool global;
	int err, cpu;

	mutex_lock(&fsock_lock);
	e = how != SHUT_WR ? fsock_find(sock->sk) : NULL;
	g = e ? e->grp : NULL;
	global = e && e->cpu < 0;
	if (e && !global)
		fsock_retire(e);
	err = orig->shutdown(sock, how);
	for (cpu = 0; global && !err && cpu < nr_cpu_ids; cpu++) {
		struct fsock_ent *l = rcu_dereference_protected(g->local[cpu],
								lockdep_is_held(&fsock_lock));

		if (l)
			fsock_stop(l->sock, how);
	}
	if (g)
		fsock_regen(g);
	mutex_unlock(&fsock_lock);
	return err;
}

/*
 * Non-blocking accept from local `lfile` into `newsock` (consumes the file reference). The
 * syscall checked the global; the local is another socket, so the LSM sees it too.
 */
static int fsock_accept_from(const struct proto_ops *orig, struct file *lfile,
			     struct socket *newsock, int flags, bool kern)
{
	int err = fsock_sec_accept(lfile->private_data, newsock);

	if (!err)
		err = orig->accept(lfile->private_data, newsock, flags | O_NONBLOCK, kern);
	fput(lfile);
	return err == -EINVAL ? -EAGAIN : err;	/* stopped listening: its queue went on */
}

/*
 * accept(2) of a global by a process that bypasses ACCEPT (raw syscalls, an exec'd
 * program): what the global's poll reports, accept takes. The global's queue, then this
 * CPU's local and the caller's other locals, without blocking; only then the kernel's
 * accept of the global as the caller asked (blocking or not).
 */
static int fsock_accept_op(struct socket *sock, struct socket *newsock, int flags, bool kern)
{
	const struct proto_ops *orig = fsock_orig(sock->ops);
	int err = orig->accept(sock, newsock, flags | O_NONBLOCK, kern);
	int here = raw_smp_processor_id(), cpu = -1;
	struct file *lfile;

	if (err != -EAGAIN)
		return err;
	lfile = fsock_local_file(sock->sk, here);
	if (lfile)
		err = fsock_accept_from(orig, lfile, newsock, flags, kern);
	while (err == -EAGAIN && (lfile = fsock_next_adoptable(sock->sk, &cpu, here, true)))
		err = fsock_accept_from(orig, lfile, newsock, flags, kern);
	if (err == -EAGAIN && !(flags & O_NONBLOCK))
		err = orig->accept(sock, newsock, flags, kern);
	return err;
}

/* connect(AF_UNSPEC) on a listener disconnects it, i.e. unhashes it. */
static int fsock_connect_op(struct socket *sock, struct sockaddr *addr, int len, int flags)
{
	int err = fsock_orig(sock->ops)->connect(sock, addr, len, flags);

	fsock_resync(sock->sk);
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
			o->ops.shutdown = fsock_shutdown_op;
			o->ops.connect = fsock_connect_op;
			o->ops.accept = fsock_accept_op;
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
 * application's own SO_REUSEPORT sockets are not starved). Returns 0 or -errno.
 */
static int fsock_attach(struct fsock_group *g, struct sock **socks, int n, int max)
{
	struct sock_filter *insns;
	struct sock_fprog_kern fprog;
	struct bpf_prog *prog;
	u32 dflt = FSOCK_RET_HASH;
	int i, cpu, len = 0, ours = 0, err;

	/* Two instructions per group member at most: a CPU can have a dying local beside its
	 * fresh one in the group (SPAWN while the old file is in __fput), so not per CPU.
	 */
	insns = kcalloc(2 * min(n, max) + 2, sizeof(*insns), GFP_KERNEL);
	if (!insns)
		return -ENOMEM;
	insns[len++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
						    SKF_AD_OFF + SKF_AD_CPU);
	rcu_read_lock();
	for (i = 0; i < min(n, max); i++) {
		struct fsock_ent *e = fsock_find(socks[i]);

		ours += socks[i] == fsock_retiring;
		if (!e || e->grp != g)
			continue;
		ours++;
		if (e->cpu < 0) {
			dflt = i;
			continue;
		}
		if (!fsock_steer)
			continue;	/* listen spawn off: everything to the global */
		cpu = e->cpu;
		if (rcu_access_pointer(g->local[cpu]) != e)
			continue;	/* a dying local of this CPU: steer to its successor */
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
	/* The socket lock keeps the global hashed (sk_reuseport_cb set) while attaching,
	 * as for setsockopt(SO_ATTACH_REUSEPORT_CBPF).
	 */
	lock_sock(g->global.sk);
	if (g->global.sk->sk_state == TCP_LISTEN &&
	    rcu_access_pointer(g->global.sk->sk_reuseport_cb))
		err = reuseport_attach_prog(g->global.sk, prog);
	else
		err = -ENOENT;
	release_sock(g->global.sk);
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
	/* A plain socket: SO_REUSEPORT only comes with LISTEN, for sockets we manage, so
	 * a second server binding the same port still gets EADDRINUSE.
	 */
	err = sock_create(family, type & SOCK_TYPE_MASK, protocol, &sock);
	if (err)
		return err;
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

static void fsock_clear_reuseport(struct sock *sk)
{
	lock_sock(sk);
	sk->sk_reuseport = 0;
	release_sock(sk);
}

static int rp_listen(int fd, int backlog)
{
	struct socket *sock;
	struct sock *sk;
	int err, somaxconn;
	bool spawn, ours;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	sk = sock->sk;
	somaxconn = READ_ONCE(sock_net(sk)->core.sysctl_somaxconn);
	if ((unsigned int)backlog > somaxconn)
		backlog = somaxconn;	/* as listen(2) */
	err = fsock_sec_listen(sock, backlog);
	if (err)
		goto out;
	spawn = fsock_param(FSOCK_PARAM_LISTEN_SPAWN) && fsock_spawnable(sk);
	/* SO_REUSEPORT before listen: the group is formed when the socket is hashed. */
	ours = spawn && !sk->sk_reuseport;
	if (ours)
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
	if (err && ours)
		fsock_clear_reuseport(sk);	/* not managed: no sharing of its port */
out:
	sockfd_put(sock);
	return err;
}

#ifdef CONFIG_TCP_MD5SIG
/* TCP_MD5SIG keys: without them the local would accept unsigned SYNs. Both locked. */
static int fsock_inherit_md5(struct sock *gsk, struct sock *lsk)
{
	struct tcp_md5sig_info *md5;
	struct tcp_md5sig_key *key;
	int err = 0;

	md5 = rcu_dereference_protected(tcp_sk(gsk)->md5sig_info, lockdep_sock_is_held(gsk));
	if (!md5)
		return 0;
	hlist_for_each_entry_rcu(key, &md5->head, node, lockdep_sock_is_held(gsk)) {
		err = tcp_md5_do_add(lsk, &key->addr, key->family, key->prefixlen, key->l3index,
				     key->flags, key->key, key->keylen, GFP_KERNEL);
		if (err)
			break;
	}
	return err;
}
#else
static int fsock_inherit_md5(struct sock *gsk, struct sock *lsk)
{
	return 0;
}
#endif

/*
 * Options of the global that change what a listener accepts or what its connections
 * inherit (sk_clone_lock copies the listener): the local must carry them too, or not
 * exist. Both sockets locked; the local is new and private, hence the nesting annotation.
 * A socket filter cannot be copied by a module (no exported way to share it): a global
 * with one gets no locals, rather than locals that let filtered packets through.
 */
static int fsock_inherit(struct sock *gsk, struct socket *lsock)
{
	struct sock *lsk = lsock->sk;
	struct inet_connection_sock *gi = inet_csk(gsk), *li = inet_csk(lsk);
	struct tcp_sock *gt = tcp_sk(gsk), *lt = tcp_sk(lsk);
	const unsigned int bufs = SOCK_SNDBUF_LOCK | SOCK_RCVBUF_LOCK;
	char ca[TCP_CA_NAME_MAX];
	int fastopen, err;

	lock_sock(gsk);
	lock_sock_nested(lsk, SINGLE_DEPTH_NESTING);
	err = rcu_access_pointer(gsk->sk_filter) ? -EOPNOTSUPP : 0;
	if (!err)
		err = fsock_inherit_md5(gsk, lsk);
	lsk->sk_bound_dev_if = gsk->sk_bound_dev_if;
	/* SO_REUSEADDR: its children's TIME_WAIT must not block a restart on the port. */
	lsk->sk_reuse = gsk->sk_reuse;
	lsk->sk_priority = gsk->sk_priority;
	lsk->sk_mark = gsk->sk_mark;
	lsk->sk_rcvtimeo = gsk->sk_rcvtimeo;
	lsk->sk_sndtimeo = gsk->sk_sndtimeo;
	lsk->sk_lingertime = gsk->sk_lingertime;
	sock_valbool_flag(lsk, SOCK_LINGER, sock_flag(gsk, SOCK_LINGER));
	sock_valbool_flag(lsk, SOCK_KEEPOPEN, sock_flag(gsk, SOCK_KEEPOPEN));
	WRITE_ONCE(lsk->sk_rcvlowat, READ_ONCE(gsk->sk_rcvlowat));
	lsk->sk_userlocks = (lsk->sk_userlocks & ~bufs) | (gsk->sk_userlocks & bufs);
	WRITE_ONCE(lsk->sk_sndbuf, READ_ONCE(gsk->sk_sndbuf));
	WRITE_ONCE(lsk->sk_rcvbuf, READ_ONCE(gsk->sk_rcvbuf));
	lsk->sk_max_pacing_rate = gsk->sk_max_pacing_rate;
	inet_sk(lsk)->tos = inet_sk(gsk)->tos;
	inet_sk(lsk)->freebind = inet_sk(gsk)->freebind;
	inet_sk(lsk)->transparent = inet_sk(gsk)->transparent;
	lt->nonagle = gt->nonagle;
	lt->keepalive_time = gt->keepalive_time;
	lt->keepalive_intvl = gt->keepalive_intvl;
	lt->keepalive_probes = gt->keepalive_probes;
	lt->linger2 = gt->linger2;
	lt->window_clamp = gt->window_clamp;
	lt->rx_opt.user_mss = gt->rx_opt.user_mss;
	lt->notsent_lowat = gt->notsent_lowat;
	li->icsk_user_timeout = gi->icsk_user_timeout;
	li->icsk_syn_retries = gi->icsk_syn_retries;
	li->icsk_accept_queue.rskq_defer_accept = gi->icsk_accept_queue.rskq_defer_accept;
	fastopen = gi->icsk_accept_queue.fastopenq.max_qlen;
	strscpy(ca, gi->icsk_ca_ops->name, sizeof(ca));
	release_sock(lsk);
	release_sock(gsk);
	/* Through setsockopt: these set up more than one field (TFO key, module refs). */
	if (!err && fastopen)
		err = lsock->ops->setsockopt(lsock, SOL_TCP, TCP_FASTOPEN,
					     KERNEL_SOCKPTR(&fastopen), sizeof(fastopen));
	if (!err && strcmp(ca, inet_csk(lsk)->icsk_ca_ops->name))
		err = lsock->ops->setsockopt(lsock, SOL_TCP, TCP_CONGESTION, KERNEL_SOCKPTR(ca),
					     strlen(ca));
	return err;
}

/*
 * A new listening sibling of the global for `cpu` (fsock_lock held), made with the
 * credentials of whoever opened the global: with a root master and unprivileged
 * workers, the local must be in the same reuseport group (same owner uid) and may bind
 * a privileged port as the global did; LSM checks see the same subject as for the global.
 */
static struct socket *fsock_new_local(struct socket *gsock, int cpu)
{
	const struct cred *old = override_creds(gsock->file->f_cred);
	struct sock *gsk = gsock->sk;
	struct sockaddr_storage addr;
	struct socket *lsock;
	int err, len;

	err = __sock_create(sock_net(gsk), gsk->sk_family, SOCK_STREAM, gsk->sk_protocol,
			    &lsock, 0);
	if (err)
		goto out;
	sock_set_reuseport(lsock->sk);
	if (gsk->sk_family == AF_INET6 && gsk->sk_ipv6only)
		ip6_sock_set_v6only(lsock->sk);
	err = fsock_inherit(gsk, lsock);
	/* The kernel's own selection then prefers it on its CPU too (hash fallback). */
	if (!err)
		err = sock_setsockopt(lsock, SOL_SOCKET, SO_INCOMING_CPU,
				      KERNEL_SOCKPTR(&cpu), sizeof(cpu));
	if (!err) {
		len = kernel_getsockname(gsock, (struct sockaddr *)&addr);
		err = len < 0 ? len : fsock_sec_bind(lsock, (struct sockaddr *)&addr, len);
		if (!err)
			err = kernel_bind(lsock, (struct sockaddr *)&addr, len);
	}
	if (!err)
		err = fsock_sec_listen(lsock, READ_ONCE(gsk->sk_max_ack_backlog));
	if (!err)
		err = kernel_listen(lsock, READ_ONCE(gsk->sk_max_ack_backlog));
	if (err)
		sock_release(lsock);
out:
	revert_creds(old);
	return err ? ERR_PTR(err) : lsock;
}

/*
 * Spawn for `cpu` (fsock_lock held): *out gets a new reference to the local socket's
 * file (not installed anywhere yet).
 */
static int fsock_spawn_locked(struct socket *gsock, int cpu, struct file **out)
{
	struct fsock_group *g;
	struct fsock_ent *e, *l;
	struct socket *lsock;
	struct file *file;

	e = fsock_register(gsock);
	if (IS_ERR(e))
		return PTR_ERR(e);
	if (e->cpu >= 0 || gsock->sk->sk_state != TCP_LISTEN)
		return -EINVAL;		/* a local, or a global that stopped listening */
	g = e->grp;
	l = rcu_dereference_protected(g->local[cpu], lockdep_is_held(&fsock_lock));
	if (l) {
		/* Idempotent: the existing local socket, unless its last fd is already being
		 * closed (f_count 0; its release waits for fsock_lock): then a fresh one.
		 */
		rcu_read_lock();
		file = fsock_ent_file(l);
		rcu_read_unlock();
		if (file) {
			/* The latest spawner owns it: a reload's new worker, not the old one. */
			WRITE_ONCE(l->owner, task_tgid_nr(current));
			*out = file;
			return 0;
		}
		RCU_INIT_POINTER(g->local[cpu], NULL);	/* its release retires it */
		g->nr_local--;
	}
	l = kzalloc(sizeof(*l), GFP_KERNEL);
	if (!l)
		return -ENOMEM;
	lsock = fsock_new_local(gsock, cpu);
	if (IS_ERR(lsock)) {
		kfree(l);
		return PTR_ERR(lsock);
	}
	/* File first: its failure paths release the socket while it has the kernel's ops. */
	file = sock_alloc_file(lsock, 0, NULL);
	if (IS_ERR(file)) {
		kfree(l);
		return PTR_ERR(file);
	}
	if (fsock_take_ops(lsock))	/* same ops as the global: cannot fail */
		WARN_ON_ONCE(1);
	l->sk = lsock->sk;
	l->sock = lsock;
	l->grp = g;
	l->cpu = cpu;
	l->owner = task_tgid_nr(current);
	hash_add_rcu(fsock_hash, &l->node, (unsigned long)l->sk);
	rcu_assign_pointer(g->local[cpu], l);
	g->nr_local++;
	fsock_regen(g);
	*out = file;
	return 0;
}

static int rp_spawn(int fd, int cpu, struct file **local)
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
	err = fsock_spawn_locked(gsock, cpu, local);
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

/* SPAWN_ALL: the new local fds are the caller's (close-on-exec, not reported). */
static int fsock_spawn_one_fd(struct socket *gsock, int cpu)
{
	struct file *file;
	int fd, err;

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0)
		return fd;
	err = fsock_spawn_locked(gsock, cpu, &file);
	if (err) {
		put_unused_fd(fd);
		return err;
	}
	fd_install(fd, file);
	return 0;
}

static int rp_spawn_all(int cpu)
{
	struct fsock_collect *c;
	int i, done = 0, err = 0;

	c = kzalloc(sizeof(*c), GFP_KERNEL);
	if (!c)
		return -ENOMEM;
	iterate_fd(current->files, 0, fsock_collect_global, c);
	mutex_lock(&fsock_lock);
	for (i = 0; i < c->n && !err; i++) {
		struct socket *gsock = sock_from_file(c->files[i]);
		struct fsock_ent *e = fsock_find(gsock->sk);

		if (e && rcu_access_pointer(e->grp->local[cpu]))
			continue;
		err = fsock_spawn_one_fd(gsock, cpu);
		done += !err;
	}
	mutex_unlock(&fsock_lock);
	for (i = 0; i < c->n; i++)
		fput(c->files[i]);
	kfree(c);
	/* Locals already made are the caller's (and it stays pinned for them). */
	return done ? done : err;
}

static int fsock_put_addr(struct socket *newsock, struct sockaddr __user *uaddr,
			  int __user *uaddrlen)
{
	struct sockaddr_storage addr;
	int len, ulen;

	len = newsock->ops->getname(newsock, (struct sockaddr *)&addr, 2);
	if (len < 0)
		return len;
	if (get_user(ulen, uaddrlen))
		return -EFAULT;
	if (ulen < 0)
		return -EINVAL;
	if (copy_to_user(uaddr, &addr, min(len, ulen)) || put_user(len, uaddrlen))
		return -EFAULT;
	return 0;
}

/*
 * Non-blocking accept on `sock`: a new fd, -EAGAIN, or -errno. The steps of accept4(2),
 * LSM check included (the kernel_accept helper has none and labels the socket as the kernel's).
 */
static int fsock_accept_one(struct socket *sock, int cpu, int flags,
			    struct sockaddr __user *uaddr, int __user *uaddrlen)
{
	struct socket *newsock;
	struct file *file;
	int err, fd;

	newsock = sock_alloc();
	if (!newsock)
		return -ENFILE;
	newsock->type = sock->type;
	/* Accepted sockets get the kernel's ops: no module cost after accept. */
	newsock->ops = fsock_is_ours(sock->ops) ? fsock_orig(sock->ops) : sock->ops;
	__module_get(newsock->ops->owner);
	/* The fd and the file before the connection, as accept4(2) does: a caller out of
	 * either must leave it queued, not reset it. */
	fd = get_unused_fd_flags(flags & O_CLOEXEC);
	if (fd < 0) {
		sock_release(newsock);
		return fd;
	}
	file = sock_alloc_file(newsock, flags & O_NONBLOCK, sock->sk->sk_prot_creator->name);
	if (IS_ERR(file)) {	/* newsock went with it */
		put_unused_fd(fd);
		return PTR_ERR(file);
	}
	err = fsock_sec_accept(sock, newsock);
	if (!err)	/* the kernel's accept: ACCEPT chooses the queue itself */
		err = newsock->ops->accept(sock, newsock, O_NONBLOCK, false);
	if (!err && uaddr)
		err = fsock_put_addr(newsock, uaddr, uaddrlen);
	if (err) {
		fput(file);	/* releases newsock */
		put_unused_fd(fd);
		return err;
	}
	if (READ_ONCE(newsock->sk->sk_incoming_cpu) == cpu)
		fsock_stat_inc(FSOCK_STAT_STEERED);
	fd_install(fd, file);
	return fd;
}

/*
 * Both queues of this CPU empty: the caller's locals of other CPUs (it was re-pinned and
 * is woken by them) and abandoned ones. Counted as global accepts: a fallback, not the
 * CPU's own local. -EAGAIN when none has a connection.
 */
static int fsock_accept_adopted(struct socket *gsock, int cpu, int flags,
				struct sockaddr __user *uaddr, int __user *uaddrlen)
{
	struct file *lfile;
	int err = -EAGAIN, c = -1;

	while (err == -EAGAIN && (lfile = fsock_next_adoptable(gsock->sk, &c, cpu, true))) {
		fsock_stat_inc(FSOCK_STAT_GLOBAL_LOOKUP);
		err = fsock_accept_one(lfile->private_data, cpu, flags, uaddr, uaddrlen);
		if (err == -EINVAL)
			err = -EAGAIN;	/* stopped listening meanwhile: its queue went to the global */
		if (err >= 0)
			fsock_stat_inc(FSOCK_STAT_GLOBAL_ACCEPT);
		fput(lfile);
	}
	return err;
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
	 * when this CPU has no local socket.
	 */
	err = -EAGAIN;
	for (i = 0; i < (lsock ? 2 : 1) && err == -EAGAIN; i++) {
		bool local = lsock && (i == 0) != global_first;

		if (local) {
			fsock_stat_inc(FSOCK_STAT_LOCAL_LOOKUP);
			err = fsock_accept_one(lsock, cpu, flags, uaddr, uaddrlen);
			if (err == -EINVAL)
				err = -EAGAIN;	/* no longer listening: the global then */
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
	if (err == -EAGAIN)
		err = fsock_accept_adopted(gsock, cpu, flags, uaddr, uaddrlen);
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
 * Close fd `fd` only if it still refers to `file`: the fd is taken out of the table and
 * checked in one step; if another thread has meanwhile reused the number, that file is
 * given back to the process (under a new number: the kernel does not export a way to
 * put it back at the same one) instead of being closed.
 */
static void fsock_close_if(int fd, struct file *file)
{
	struct file *got = close_fd_get_file(fd);
	int nfd;

	if (!got || got == file) {
		if (got)
			filp_close(got, current->files);
		return;
	}
	nfd = get_unused_fd_flags(0);
	if (nfd >= 0)
		fd_install(nfd, got);
	else
		fput(got);
	pr_warn_ratelimited(FSOCK_NAME ": pid %d: fd %d was reused during CLOSE, now fd %d\n",
			    current->pid, fd, nfd);
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
		fsock_close_if(c->fds[i], c->files[i]);
		fput(c->files[i]);
	}
	kfree(c);
	return err;
}

static int rp_shutdown(int fd, int how)
{
	struct socket *sock;
	int err;

	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	err = fsock_sec_shutdown(sock, how);
	/* Through sock->ops: on a global, fsock_shutdown_op() shuts its locals too. */
	if (!err)
		err = kernel_sock_shutdown(sock, how);
	sockfd_put(sock);
	return err;
}

/* enable_listen_spawn at run time: 0 steers every group's SYNs to the global socket
 * (locals are still drained by ACCEPT), non-zero steers to the locals again.
 */
static int rp_set_param(enum fsock_param p, int val)
{
	struct fsock_ent *e;
	int bkt;

	if (p != FSOCK_PARAM_LISTEN_SPAWN)
		return 0;
	mutex_lock(&fsock_lock);
	fsock_steer = val != 0;
	hash_for_each(fsock_hash, bkt, e, node)
		if (e->cpu < 0)
			fsock_regen(e->grp);
	mutex_unlock(&fsock_lock);
	return 0;
}

static int rp_init(void)
{
	return 0;
}

static void rp_exit(void)
{
	/* Every registered socket held a module reference, so the table is empty here;
	 * wait for the kfree_rcu() of the last unlinked entries.
	 */
	WARN_ON(!hash_empty(fsock_hash));
	rcu_barrier();
}

const struct fsock_backend fsock_backend = {
	.name		= "reuseport",
	.features	= FSOCK_FEAT_LISTEN_SPAWN | FSOCK_FEAT_REUSEPORT,
	.init		= rp_init,
	.exit		= rp_exit,
	.set_param	= rp_set_param,
	.socket		= rp_socket,
	.listen		= rp_listen,
	.spawn		= rp_spawn,
	.spawn_all	= rp_spawn_all,
	.accept		= rp_accept,
	.close		= rp_close,
	.shutdown	= rp_shutdown,
};
