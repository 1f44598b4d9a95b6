/* Live processes to snapshot: they hang or spin until a file appears in their volume, then exit 0.
 *
 *   hang deadlock   two threads each hold one mutex and wait for the other's
 *   hang spin       a thread spins; on exit it prints the longest pause it saw (in µs),
 *                   which is how long the process was stopped from its own point of view
 *   hang alloc N    N MiB touched, and a spinner as above
 *   hang noise N    N MiB of pseudo-random bytes (a core that does not compress)
 *   hang mapped F   F mapped (64 MiB, never touched) and file mappings asked into the core
 *                   (coredump_filter): the kernel reads F's pages from its filesystem as it dumps
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t first = PTHREAD_MUTEX_INITIALIZER, second = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t both_locked;
static volatile long longest_pause_us;
static volatile int spinning; /* set once the spinner runs: "ready" waits for it */

__attribute__((noinline)) void take_first_then_second(void) {
    pthread_mutex_lock(&first);
    pthread_barrier_wait(&both_locked);
    pthread_mutex_lock(&second);
}

__attribute__((noinline)) void take_second_then_first(void) {
    pthread_mutex_lock(&second);
    pthread_barrier_wait(&both_locked);
    pthread_mutex_lock(&first);
}

static void *left(void *p) { take_first_then_second(); return p; }
static void *right(void *p) { take_second_then_first(); return p; }

static long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000L + ts.tv_nsec / 1000;
}

__attribute__((noinline)) void spin_forever(void) {
    long last = now_us();
    spinning = 1;
    for (;;) {
        long t = now_us();
        if (t - last > longest_pause_us) longest_pause_us = t - last;
        last = t;
    }
}

static void *spinner(void *p) { spin_forever(); return p; }

static uint64_t *volatile noise;

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "deadlock";
    const char *release = argc > 3 ? argv[3] : "/data/dump-a/release";
    pthread_t a, b;
    if (!strcmp(mode, "deadlock")) {
        pthread_barrier_init(&both_locked, NULL, 2);
        pthread_create(&a, NULL, left, NULL);
        pthread_create(&b, NULL, right, NULL);
    } else if (!strcmp(mode, "spin")) {
        pthread_create(&a, NULL, spinner, NULL);
    } else if (!strcmp(mode, "alloc")) {
        pthread_create(&a, NULL, spinner, NULL);
        size_t size = (size_t)(argc > 2 ? strtoul(argv[2], NULL, 10) : 100) << 20;
        unsigned char *mem = malloc(size);
        for (size_t off = 0; off < size; off += 4096) mem[off] = (unsigned char)(off >> 12) | 1;
    } else if (!strcmp(mode, "mapped")) {
        int fd = open(argc > 2 ? argv[2] : "", O_RDONLY), filter = open("/proc/self/coredump_filter", O_WRONLY);
        if (fd < 0 || mmap(NULL, 64 << 20, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED || filter < 0 ||
            write(filter, "0x3f", 4) != 4) {
            perror("hang mapped");
            return 2;
        }
    } else if (!strcmp(mode, "noise")) {
        size_t size = (size_t)(argc > 2 ? strtoul(argv[2], NULL, 10) : 16) << 20;
        uint64_t *mem = malloc(size), x = 88172645463325252ULL;
        noise = mem;  /* kept: the bytes must be in the core */
        for (size_t i = 0; i < size / 8; i++) {  /* xorshift64 */
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            mem[i] = x;
        }
    }
    if (!strcmp(mode, "spin") || !strcmp(mode, "alloc"))
        while (!spinning) usleep(1000);  /* a snapshot taken before the thread ran would not show it */
    printf("ready\n");
    fflush(stdout);
    while (access(release, F_OK) != 0) usleep(20000);
    printf("longest pause %ld us\n", longest_pause_us);
    fflush(stdout);
    _exit(0);
}
