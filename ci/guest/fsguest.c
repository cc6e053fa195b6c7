/* fsguest: helpers for the smoke guest's init.
 * Built with `musl-gcc -static` because Debian's glibc busybox cannot list directories on
 * 2.6.32 (glibc's fstat goes through fstatat(AT_EMPTY_PATH), added in 2.6.39), and the
 * init has to enumerate /sys/class/net and /sys/class/net/IF/queues on every target.
 * Under TCG every exec costs tens of milliseconds, so loops that a shell would run as one
 * process per step (a /proc scan per poll, `sleep` per poll) live here instead.
 * Usage: fsguest ls DIR          -- one entry per line, without . and ..
 *        fsguest reap NAME...    -- SIGTERM every live process named NAME, children before
 *                                   their parents (a parent that reaps its workers then finds
 *                                   them gone instead of sleeping on them), poll (5 ms) the
 *                                   ones found until they are gone, SIGKILL what is left after
 *                                   500 ms; prints nothing; exit 0 when none was running, 1
 *                                   when some were
 *        fsguest listen PORT PID MS -- poll (5 ms) /proc/net/tcp{,6} until a socket listens on
 *                                   PORT; prints the number of polls; exit 0 listening, 1 when
 *                                   PID died first (or is a zombie), 2 after MS milliseconds
 *                                   (the shell loop paid a grep and a `sleep` exec per poll)
 *        fsguest klog [FILE]     -- the kernel log lines (as dmesg prints them) that hold
 *                                   BUG, WARNING or Oops as a word or panic/Panic anywhere,
 *                                   except lines saying "command line" in any case: what
 *                                   `dmesg | grep -E '\b(BUG|WARNING|Oops)\b|[Pp]anic' |
 *                                   grep -vi 'command line'` printed, in one process instead
 *                                   of three; exit 1 when the log cannot be read. FILE (tests)
 *                                   replaces the kernel's buffer, in its "<level>line" format */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/klog.h>
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

static int alive(const char *pid);

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

#define REAP_MAX 256

struct proc_ref {
	pid_t pid, ppid;
};

/* The parent pid from a /proc/PID/stat line ("pid (comm) S ppid ..."), or 0. */
static pid_t stat_ppid(const char *pid)
{
	char path[64], buf[512], *close;
	FILE *f;
	size_t len;
	int ppid = 0;

	snprintf(path, sizeof(path), "/proc/%s/stat", pid);
	f = fopen(path, "r");
	if (!f)
		return 0;
	len = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[len] = '\0';
	close = strrchr(buf, ')');
	if (close && sscanf(close + 1, " %*c %d", &ppid) != 1)
		ppid = 0;
	return (pid_t)ppid;
}

/* Every live process named in `names` (up to `max`) into `out`; the number found. */
static int find_named(char **names, int n, struct proc_ref *out, int max)
{
	DIR *d = opendir("/proc");
	struct dirent *e;
	int found = 0;

	if (!d)
		return 0;
	while ((e = readdir(d)) != NULL && found < max) {
		if (e->d_name[0] < '1' || e->d_name[0] > '9' || !matches(e->d_name, names, n))
			continue;
		out[found].pid = (pid_t)atoi(e->d_name);
		out[found].ppid = stat_ppid(e->d_name);
		found++;
	}
	closedir(d);
	return found;
}

static int is_live(pid_t pid)
{
	char name[24];

	snprintf(name, sizeof(name), "%d", (int)pid);
	return alive(name);
}

static int has_parent_in(const struct proc_ref *p, const struct proc_ref *set, int n)
{
	int i;

	for (i = 0; i < n; i++)
		if (set[i].pid == p->ppid)
			return 1;
	return 0;
}

/* SIGTERM the members of `set` of one rank (children: their parent is in the set; or
 * the others) and poll until they are gone or `*polls` runs out. */
static void term_rank(const struct proc_ref *set, int n, int children, int *polls)
{
	struct timespec step = {0, REAP_POLL_NS};
	int i, left;

	for (i = 0; i < n; i++)
		if (has_parent_in(&set[i], set, n) == children)
			kill(set[i].pid, SIGTERM);
	for (; *polls > 0; (*polls)--) {
		for (left = 0, i = 0; i < n; i++)
			left += has_parent_in(&set[i], set, n) == children && is_live(set[i].pid);
		if (!left)
			return;
		nanosleep(&step, NULL);
	}
}

static int reap(char **names, int n)
{
	struct proc_ref set[REAP_MAX];
	int polls = REAP_POLLS, found, any = 0, scans, i;

	/* A second scan catches what was started meanwhile (a fork racing the first one). */
	for (scans = 0; scans < 8 && (found = find_named(names, n, set, REAP_MAX)) > 0; scans++) {
		any = 1;
		term_rank(set, found, 1, &polls);
		term_rank(set, found, 0, &polls);
		if (polls <= 0) {
			for (i = 0; i < found; i++)
				kill(set[i].pid, SIGKILL);
			break;
		}
	}
	return any;
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

static int is_word(char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_';
}

/* 1 when `line` holds `word` with no word character on either side (grep's \b). */
static int has_word(const char *line, const char *word)
{
	size_t len = strlen(word);
	const char *p;

	for (p = strstr(line, word); p; p = strstr(p + 1, word))
		if ((p == line || !is_word(p[-1])) && !is_word(p[len]))
			return 1;
	return 0;
}

static int has_nocase(const char *line, const char *what)
{
	size_t len = strlen(what);

	for (; *line; line++)
		if (!strncasecmp(line, what, len))
			return 1;
	return 0;
}

static int klog_bad(const char *line)
{
	if (has_nocase(line, "command line"))
		return 0;
	return has_word(line, "BUG") || has_word(line, "WARNING") || has_word(line, "Oops") ||
	       strstr(line, "panic") || strstr(line, "Panic");
}

/* The kernel's log buffer (klogctl), or the file `from` in its format (tests). */
static char *read_klog(const char *from)
{
	int size = from ? 1 << 20 : klogctl(10, NULL, 0); /* SYSLOG_ACTION_SIZE_BUFFER */
	char *buf;
	long len;

	if (size <= 0)
		size = 1 << 20;
	buf = malloc((size_t)size + 1);
	if (!buf)
		return NULL;
	if (from) {
		FILE *f = fopen(from, "r");

		len = f ? (long)fread(buf, 1, (size_t)size, f) : -1;
		if (f)
			fclose(f);
	} else {
		len = klogctl(3, buf, size); /* SYSLOG_ACTION_READ_ALL */
	}
	if (len < 0) {
		perror(from ? from : "klogctl");
		free(buf);
		return NULL;
	}
	buf[len] = '\0';
	return buf;
}

static int klog(const char *from)
{
	char *buf = read_klog(from), *line, *next;

	if (!buf)
		return 1;
	for (line = buf; line && *line; line = next) {
		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		/* "<6>[ 1.0] text" -> "[ 1.0] text", as dmesg prints it */
		if (line[0] == '<') {
			char *end = line + 1;
			while (*end >= '0' && *end <= '9')
				end++;
			if (*end == '>' && end > line + 1)
				line = end + 1;
		}
		if (klog_bad(line))
			puts(line);
	}
	free(buf);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "ls"))
		return list(argv[2]);
	if (argc >= 3 && !strcmp(argv[1], "reap"))
		return reap(argv + 2, argc - 2);
	if (argc == 5 && !strcmp(argv[1], "listen"))
		return wait_listen(argv[2], argv[3], argv[4]);
	if ((argc == 2 || argc == 3) && !strcmp(argv[1], "klog"))
		return klog(argv[2]);
	fputs("usage: fsguest ls DIR | fsguest reap NAME... | fsguest listen PORT PID MS | fsguest klog\n", stderr);
	return 2;
}
