/* One program, many ways to die: the crash corpus of corevault's tests and demo.
 *   crasher segv              NULL dereference in crash_here()
 *   crasher thread            a worker thread crashes while four others wait
 *   crasher abort             abort() from main
 *   crasher dropuid UID       setgid/setuid to UID, then SIGSEGV (dump mode 2 with suid_dumpable=2)
 *   crasher dumpable UID      the same, but PR_SET_DUMPABLE 1 like nginx (dump mode 1, as UID)
 *   crasher comm NAME         set comm to NAME, then SIGSEGV
 *   crasher alloc MIB         touch MIB MiB (every other page zero), then SIGSEGV
 *   crasher noise KIB         fill KIB KiB with pseudo-random bytes (incompressible), then SIGSEGV
 *   crasher threads N         N threads wait, one more crashes in worker_crash()
 *   crasher stack             unbounded recursion in recurse(): stack overflow
 *   crasher fpe               integer division by zero in divide()
 *   crasher ill               ud2 in illegal_instruction(): SIGILL
 *   crasher bus               touch a page of a truncated mmap in read_truncated(): SIGBUS
 *   crasher assert            a failed assert() in check_config()
 *   crasher libc              a crash inside libc: insque() on a NULL element, from enqueue()
 *   crasher strlen            a NULL read inside libc's strlen(), from measure()
 *   crasher unlink            delete its own executable, then SIGSEGV (a "(deleted)" executable)
 */
#include <assert.h>
#include <fcntl.h>
#include <pthread.h>
#include <search.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

__attribute__((noinline)) int recurse(int depth) {
    volatile char frame[256];
    frame[0] = (char)depth;
    return recurse(depth + 1) + frame[0];
}

volatile int zero = 0;
__attribute__((noinline)) int divide(int a) { return a / zero; }

__attribute__((noinline)) void illegal_instruction(void) { __builtin_trap(); }

__attribute__((noinline)) int read_truncated(void) {
    char path[] = "/dev/shm/corevault-bus-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0 || ftruncate(fd, 8192)) { perror("mkstemp"); exit(2); }
    volatile char *map = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    unlink(path);
    if (ftruncate(fd, 0)) exit(2);
    return map[4096];
}

struct config { const char *name; };
__attribute__((noinline)) void check_config(const struct config *c) { assert(c != NULL && "config must be loaded"); }

__attribute__((noinline)) void enqueue(void *elem) { insque(elem, NULL); }

__attribute__((noinline)) size_t measure(const char *s) { return strlen(s); }

static void run_threads(int n) {
    pthread_t t;
    for (int i = 0; i < n; i++) pthread_create(&t, NULL, waiter, NULL);
    pthread_create(&t, NULL, worker_crash, NULL);
    pthread_join(t, NULL);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "segv";
    if (!strcmp(mode, "thread")) {
        run_threads(4);
    } else if (!strcmp(mode, "threads")) {
        run_threads(argc > 2 ? atoi(argv[2]) : 199);
    } else if (!strcmp(mode, "stack")) {
        return recurse(0);
    } else if (!strcmp(mode, "fpe")) {
        return divide(42);
    } else if (!strcmp(mode, "ill")) {
        illegal_instruction();
    } else if (!strcmp(mode, "bus")) {
        return read_truncated();
    } else if (!strcmp(mode, "assert")) {
        check_config(NULL);
    } else if (!strcmp(mode, "unlink")) {
        if (unlink(argv[0])) { perror("unlink"); return 2; }
    } else if (!strcmp(mode, "libc")) {
        enqueue((void *)nowhere);
    } else if (!strcmp(mode, "strlen")) {
        printf("%zu\n", measure((const char *)nowhere));
    } else if (!strcmp(mode, "abort")) {
        abort();
    } else if (!strcmp(mode, "dropuid") || !strcmp(mode, "dumpable")) {
        int uid = argc > 2 ? atoi(argv[2]) : 33;
        if (setgid(uid) || setuid(uid)) { perror("setuid"); return 2; }
        if (!strcmp(mode, "dumpable")) prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
    } else if (!strcmp(mode, "comm")) {
        prctl(PR_SET_NAME, argc > 2 ? argv[2] : "renamed", 0, 0, 0);
    } else if (!strcmp(mode, "noise")) {
        size_t size = (argc > 2 ? strtoul(argv[2], NULL, 10) : 1024) << 10;
        uint64_t *mem = malloc(size + 8), x = 0x9E3779B97F4A7C15u;
        for (size_t i = 0; i < size / 8; i++) {  /* xorshift64 */
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            mem[i] = x;
        }
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
