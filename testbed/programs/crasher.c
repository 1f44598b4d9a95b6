/* One program, many ways to die: the crash corpus of corevault's tests and demo.
 *   crasher segv              NULL dereference in crash_here()
 *   crasher thread            a worker thread crashes while four others wait
 *   crasher abort             abort() from main
 *   crasher dropuid UID       setgid/setuid to UID, then SIGSEGV (dump mode 2 with suid_dumpable=2)
 *   crasher dumpable UID      the same, but PR_SET_DUMPABLE 1 like nginx (dump mode 1, as UID)
 *   crasher comm NAME         set comm to NAME, then SIGSEGV
 *   crasher alloc MIB         touch MIB MiB (every other page zero), then SIGSEGV
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

/* volatile: the compiler may not prove the store away or turn it into a trap */
int *volatile nowhere = NULL;

__attribute__((noinline)) void crash_here(volatile int *p) { *p = 42; }

__attribute__((noinline)) static void *worker_crash(void *arg) {
    (void)arg;
    usleep(20000);
    crash_here(nowhere);
    return NULL;
}

static void *waiter(void *arg) { (void)arg; pause(); return NULL; }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "segv";
    if (!strcmp(mode, "thread")) {
        pthread_t t[5];
        for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, waiter, NULL);
        pthread_create(&t[4], NULL, worker_crash, NULL);
        pthread_join(t[4], NULL);
    } else if (!strcmp(mode, "abort")) {
        abort();
    } else if (!strcmp(mode, "dropuid") || !strcmp(mode, "dumpable")) {
        int uid = argc > 2 ? atoi(argv[2]) : 33;
        if (setgid(uid) || setuid(uid)) { perror("setuid"); return 2; }
        if (!strcmp(mode, "dumpable")) prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    } else if (!strcmp(mode, "comm")) {
        prctl(PR_SET_NAME, argc > 2 ? argv[2] : "renamed", 0, 0, 0);
    } else if (!strcmp(mode, "alloc")) {
        size_t mib = argc > 2 ? strtoul(argv[2], NULL, 10) : 16;
        size_t size = mib << 20;
        unsigned char *mem = malloc(size);
        for (size_t off = 0; off < size; off += 8192)
            for (size_t i = 0; i < 4096; i += 8) *(size_t *)(mem + off + i) = off * 2654435761u + i;
    }
    crash_here(nowhere);
    return 0;
}
