/* fsguest: helpers for the smoke guest's init.
 * Built with `musl-gcc -static` because Debian's glibc busybox cannot list directories on
 * 2.6.32 (glibc's fstat goes through fstatat(AT_EMPTY_PATH), added in 2.6.39), and the
 * init has to enumerate /sys/class/net and /sys/class/net/IF/queues on every target.
 * Under TCG every exec costs tens of milliseconds, so loops that a shell would run as one
 * process per step (a /proc scan per poll, `sleep` per poll) live here instead.
 * Usage: fsguest ls DIR          -- one entry per line, without . and ..
 *        fsguest reap NAME...    -- SIGTERM every live process named NAME, poll (5 ms) until
 *                                   they are gone, SIGKILL what is left after 500 ms; prints
 *                                   nothing; exit 0 when none was running, 1 when some were
 *        fsguest listen PORT PID MS -- poll (5 ms) /proc/net/tcp{,6} until a socket listens on
 *                                   PORT; prints the number of polls; exit 0 listening, 1 when
 *                                   PID died first (or is a zombie), 2 after MS milliseconds
 *                                   (the shell loop paid a grep and a `sleep` exec per poll) */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#define REAP_POLL_NS 5000000L
#define REAP_POLLS 100 /* 500 ms, as the shell version waited before SIGKILL */

static int list(const char *path)
{
	DIR *d = opendir(path);
	struct dirent *e;

	if (!d) {
		perror(path);
		return 1;
	}
	while ((e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			puts(e->d_name);
	}
	closedir(d);
	return 0;
}

/* The command name of PID when /proc/PID/stat shows a live (not zombie) process, else NULL
 * (a zombie holds no files, so it cannot keep a module busy or a port bound). `buf` holds it. */
static const char *live_comm(const char *pid, char *buf, size_t size)
{
	char path[64], *open, *close;
	FILE *f;
	size_t len;

	snprintf(path, sizeof(path), "/proc/%s/stat", pid);
	f = fopen(path, "r");
	if (!f)
		return NULL;
	len = fread(buf, 1, size - 1, f);
	fclose(f);
	buf[len] = '\0';
	open = strchr(buf, '(');
	close = strrchr(buf, ')');
	if (!open || !close || close < open || close[1] != ' ' || close[2] == 'Z')
		return NULL;
	*close = '\0';
	return open + 1;
}

/* 1 when PID is live and named one of `names`. */
static int matches(const char *pid, char **names, int n)
{
	char buf[256];
	const char *comm = live_comm(pid, buf, sizeof(buf));
	int i;

	for (i = 0; comm && i < n; i++)
		if (!strcmp(comm, names[i]))
			return 1;
	return 0;
}

/* Send `sig` (0 = probe) to every live process named in `names`; the number found. */
static int signal_named(int sig, char **names, int n)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	int found = 0;

	if (!d)
		return 0;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] < '1' || e->d_name[0] > '9' || !matches(e->d_name, names, n))
			continue;
		if (kill((pid_t)atoi(e->d_name), sig) == 0)
			found++;
	}
	closedir(d);
	return found;
}

static int reap(char **names, int n)
{
	struct timespec step = {0, REAP_POLL_NS};
	int i;

	if (!signal_named(SIGTERM, names, n))
		return 0;
	for (i = 0; i < REAP_POLLS; i++) {
		if (!signal_named(0, names, n))
			return 1;
		nanosleep(&step, NULL);
	}
	signal_named(SIGKILL, names, n);
	return 1;
}

static int alive(const char *pid)
{
	char buf[256];

	return live_comm(pid, buf, sizeof(buf)) != NULL;
}

/* 1 when a line of the /proc/net/tcp-format file `path` is a LISTEN (state 0A) socket on `port`. */
static int listening_in(const char *path, unsigned port)
{
	char line[512], local[128], remote[128], state[16];
	FILE *f = fopen(path, "r");
	int found = 0;

	if (!f)
		return 0;
	while (!found && fgets(line, sizeof(line), f)) {
		char *colon;

		if (sscanf(line, " %*[0-9]: %127s %127s %15s", local, remote, state) != 3)
			continue; /* the header line */
		colon = strrchr(local, ':');
		found = colon && strtoul(colon + 1, NULL, 16) == port && !strcmp(state, "0A");
	}
	fclose(f);
	return found;
}

static int wait_listen(const char *port_s, const char *pid, const char *ms_s)
{
	struct timespec step = {0, REAP_POLL_NS};
	unsigned port = (unsigned)strtoul(port_s, NULL, 10);
	long polls = 0, limit = strtol(ms_s, NULL, 10) / (REAP_POLL_NS / 1000000L);
	int rc = 2;

	for (; polls <= limit; polls++) {
		if (listening_in("/proc/net/tcp", port) || listening_in("/proc/net/tcp6", port)) {
			rc = 0;
			break;
		}
		if (!alive(pid)) {
			rc = 1;
			break;
		}
		nanosleep(&step, NULL);
	}
	printf("%ld\n", polls);
	return rc;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "ls"))
		return list(argv[2]);
	if (argc >= 3 && !strcmp(argv[1], "reap"))
		return reap(argv + 2, argc - 2);
	if (argc == 5 && !strcmp(argv[1], "listen"))
		return wait_listen(argv[2], argv[3], argv[4]);
	fputs("usage: fsguest ls DIR | fsguest reap NAME... | fsguest listen PORT PID MS\n", stderr);
	return 2;
}
