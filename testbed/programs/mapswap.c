/* mapswap MANY FILE OTHER: FILE's first page mapped, then the first page of each file in the
 * directory MANY (below it: a reader of maps meets them first); on SIGABRT it dumps core.
 *
 * A process that shares its memory (clone with CLONE_VM, not a thread: the kernel's dump stops only
 * the crashed thread group) waits until a file of MANY is opened (a handler opening the mapped files
 * it found in maps, so after it read maps), then maps OTHER's first page at FILE's addresses
 * (MAP_FIXED): /proc/PID/map_files then holds OTHER under the range maps gave for FILE.
 *
 * With OTHER "-" nothing is swapped: file mappings are asked into the core (coredump_filter), so
 * the kernel's dump reads FILE's one page (on a FUSE server that stopped, it waits there) and ends
 * as soon as that read fails.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <unistd.h>

static void *target;
static int other_fd, watch_fd;
static char stack[1 << 16];

static int swapper(void *unused) {
    char events[4096] __attribute__((aligned(8)));
    (void)unused;
    if (read(watch_fd, events, sizeof events) <= 0) _exit(2);
    if (mmap(target, 4096, PROT_READ, MAP_PRIVATE | MAP_FIXED, other_fd, 0) == MAP_FAILED) _exit(3);
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: mapswap MANY FILE OTHER\n");
        return 2;
    }
    int fd = open(argv[2], O_RDONLY);
    other_fd = strcmp(argv[3], "-") == 0 ? -1 : open(argv[3], O_RDONLY);
    if (fd < 0 || (other_fd < 0 && strcmp(argv[3], "-") != 0)) { perror("open"); return 2; }
    FILE *filter = other_fd < 0 ? fopen("/proc/self/coredump_filter", "w") : NULL;
    if (other_fd < 0 && (!filter || fputs("0x3f", filter) < 0 || fclose(filter) != 0)) {
        perror("coredump_filter");
        return 2;
    }
    target = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0);
    if (target == MAP_FAILED) { perror("mmap"); return 2; }
    DIR *d = opendir(argv[1]);
    if (!d) { perror(argv[1]); return 2; }
    char path[4096];
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", argv[1], e->d_name);
        int many = open(path, O_RDONLY);
        if (many < 0 || mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, many, 0) == MAP_FAILED) { perror(path); return 2; }
        close(many);
    }
    closedir(d);
    watch_fd = inotify_init1(0);
    if (watch_fd < 0 || inotify_add_watch(watch_fd, argv[1], IN_OPEN) < 0) { perror("inotify"); return 2; }
    if (other_fd >= 0 && clone(swapper, stack + sizeof stack, CLONE_VM | SIGCHLD, NULL) < 0) {
        perror("clone");
        return 2;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
