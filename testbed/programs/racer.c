/* A tenant racing the handler's publish into its own directory:
 *   racer DIR NAME PROGRAM ARGS...
 * watches DIR (inotify), writes DIR/planted, then runs PROGRAM (which crashes). It learns the
 * handler's temporary file from its creation, and once NAME appears as a directory (the
 * handler reserving the core's name, on a filesystem without hard links) renames planted over
 * that temporary file, so that the handler's rename that follows would publish planted as the
 * core. Until then it keeps renaming a file of its own back and forth in DIR: each rename holds
 * the directory's lock for a round trip to the FUSE daemon, so every step of the handler there
 * waits behind one of the tenant's, and the swap is queued before the handler's rename, which
 * comes only after its reservation is removed again (a race the tenant wins without luck).
 * It exits with PROGRAM's status once PROGRAM is gone and it swapped, or 20 s after PROGRAM is
 * gone without a reservation: the handler lets the crashed process go once its core is read, and
 * publishes the core after that.
 */
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 4 || chdir(argv[1])) {
        fprintf(stderr, "usage: racer DIR NAME PROGRAM ARGS...\n");
        return 2;
    }
    const char *name = argv[2];
    int in = inotify_init1(IN_NONBLOCK);
    if (in < 0 || inotify_add_watch(in, ".", IN_CREATE) < 0) {
        perror("inotify");
        return 2;
    }
    const char *names[] = {"planted", "busy-a"};
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(names[i], "w");
        if (!f || fputs("planted by the tenant\n", f) < 0 || fclose(f)) {
            perror(names[i]);
            return 2;
        }
    }
    const char *busy[] = {"busy-a", "busy-b"};
    int turn = 0;
    pid_t child = fork();
    if (child == 0) {
        execv(argv[3], argv + 3);
        _exit(127);
    }
    char tmp[256] = "";
    int reserved = 0, swapped = 0, status = 0;
    time_t gone = 0; /* when PROGRAM was reaped */
    alarm(60);
    for (;;) {
        char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
        ssize_t n = read(in, buf, sizeof buf);  /* non-blocking: what happened meanwhile */
        for (char *at = buf; n > 0 && at < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)at;
            at += sizeof *e + e->len;
            if (!e->len) continue;
            if (!strncmp(e->name, ".corevault-", 11))
                snprintf(tmp, sizeof tmp, "%s", e->name);
            else if ((e->mask & IN_ISDIR) && !strcmp(e->name, name) && tmp[0])
                reserved = 1;
        }
        if (reserved && !swapped) {
            swapped = 1;
            if (rename("planted", tmp)) perror("swap");
        } else if (!swapped) {
            if (rename(busy[turn], busy[!turn])) perror("busy");
            turn = !turn;
        } else {
            struct pollfd p = {in, POLLIN, 0};
            poll(&p, 1, 20);
        }
        if (!gone && waitpid(child, &status, WNOHANG) == child) gone = time(NULL);
        if (gone && (swapped || time(NULL) - gone > 20)) break;
    }
    fprintf(stderr, "racer: %s\n", swapped ? "swapped" : "saw no reservation");
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}
