/* fsguest: directory listing for the smoke guest's init.
 * Built with `musl-gcc -static` because Debian's glibc busybox cannot list directories on
 * 2.6.32 (glibc's fstat goes through fstatat(AT_EMPTY_PATH), added in 2.6.39), and the
 * init has to enumerate /sys/class/net and /sys/class/net/IF/queues on every target.
 * Usage: fsguest ls DIR   -- one entry per line, without . and .. */
#include <dirent.h>
#include <stdio.h>
#include <string.h>

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

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "ls"))
		return list(argv[2]);
	fputs("usage: fsguest ls DIR\n", stderr);
	return 2;
}
