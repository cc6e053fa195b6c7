/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Fastsocket ioctl ABI between fastsocket.ko (/dev/fastsocket) and libsocket.so.
 * This is the only place the ABI is defined: both sides include this header.
 * Any incompatible change bumps FASTSOCKET_ABI_VERSION; the library refuses to use
 * the module (falls back to plain sockets) when the versions differ.
 * Fixed-width types and explicit padding keep the layout identical for 2.6.32 and
 * 6.x kernels and for any userspace libc.
 */
#ifndef FASTSOCKET_ABI_H
#define FASTSOCKET_ABI_H

#ifdef __KERNEL__
#include <linux/types.h>
#include <linux/ioctl.h>
#else
#include <stdint.h>
#include <sys/ioctl.h>
typedef uint32_t __fs_u32;
typedef int32_t __fs_s32;
typedef uint64_t __fs_u64;
#endif

#ifdef __KERNEL__
typedef __u32 __fs_u32;
typedef __s32 __fs_s32;
typedef __u64 __fs_u64;
#endif

#define FASTSOCKET_ABI_VERSION 2
#define FASTSOCKET_DEVICE "/dev/fastsocket"
#define FASTSOCKET_IOC_MAGIC 0xB9 /* unassigned in ioctl-number.rst */

/* Feature bits reported by FSOCK_IOC_VERSION. */
#define FSOCK_FEAT_LISTEN_SPAWN   (1u << 0) /* per-CPU local listen sockets */
#define FSOCK_FEAT_FAST_EPOLL     (1u << 1) /* epitem cached in struct file */
#define FSOCK_FEAT_RFD            (1u << 2) /* receive flow deliver */
#define FSOCK_FEAT_KERNEL_HOOKS   (1u << 3) /* kernel carries the Fastsocket patches */
#define FSOCK_FEAT_REUSEPORT      (1u << 4) /* spawn implemented with SO_REUSEPORT */

struct fsock_version {
	__fs_u32 abi;       /* out: FASTSOCKET_ABI_VERSION of the module */
	__fs_u32 features;  /* out: FSOCK_FEAT_* */
	__fs_u32 listen_spawn;  /* out: current enable_listen_spawn */
	__fs_u32 pad;
};

struct fsock_socket_args {
	__fs_s32 family, type, protocol;
	__fs_s32 fd;        /* out */
};

struct fsock_listen_args {
	__fs_s32 fd;
	__fs_s32 backlog;
};

struct fsock_spawn_args {
	__fs_s32 fd;        /* the global listen socket */
	__fs_s32 cpu;       /* CPU to spawn for; -1: the CPU the caller runs on */
	__fs_s32 local_fd;  /* out: fd of the local listen socket (or -1 when kept internal) */
	__fs_s32 pad;
};

struct fsock_accept_args {
	__fs_s32 fd;        /* listen socket (global fd; the local one is found per CPU) */
	__fs_s32 flags;     /* accept4 flags (SOCK_NONBLOCK, SOCK_CLOEXEC) */
	__fs_u64 addr;      /* user pointer to struct sockaddr, may be 0 */
	__fs_u64 addrlen;   /* user pointer to socklen_t, may be 0 */
	__fs_s32 new_fd;    /* out */
	__fs_s32 pad;
};

struct fsock_close_args {
	__fs_s32 fd;
	__fs_s32 pad;
};

struct fsock_shutdown_args {
	__fs_s32 fd;
	__fs_s32 how;
};

#define FSOCK_IOC_VERSION   _IOR(FASTSOCKET_IOC_MAGIC, 0x00, struct fsock_version)
#define FSOCK_IOC_SOCKET    _IOWR(FASTSOCKET_IOC_MAGIC, 0x01, struct fsock_socket_args)
#define FSOCK_IOC_LISTEN    _IOW(FASTSOCKET_IOC_MAGIC, 0x02, struct fsock_listen_args)
#define FSOCK_IOC_SPAWN     _IOWR(FASTSOCKET_IOC_MAGIC, 0x03, struct fsock_spawn_args)
#define FSOCK_IOC_ACCEPT    _IOWR(FASTSOCKET_IOC_MAGIC, 0x04, struct fsock_accept_args)
#define FSOCK_IOC_CLOSE     _IOW(FASTSOCKET_IOC_MAGIC, 0x05, struct fsock_close_args)
#define FSOCK_IOC_SHUTDOWN  _IOW(FASTSOCKET_IOC_MAGIC, 0x06, struct fsock_shutdown_args)
#define FSOCK_IOC_SPAWN_ALL _IO(FASTSOCKET_IOC_MAGIC, 0x07) /* re-spawn listeners after fork */

#endif /* FASTSOCKET_ABI_H */
