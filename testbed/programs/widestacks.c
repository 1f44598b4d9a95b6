/* A report built to cost its reader: 64 threads wait 240 calls deep in a function whose ELF
 * symbol is 4,000 characters long (within the names' bound), then the main thread crashes.
 * Every thread's stack fits the frames a thread keeps and no run of frames is cut, so a report
 * of every frame of every thread holds 15,000 such names (64 MiB). Built without debug info. */
#include <pthread.h>
#include <unistd.h>

#define S16 "BBBBBBBBBBBBBBBB"
#define S250 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 "BBBBBBBBBB"
#define S4000 S250 S250 S250 S250 S250 S250 S250 S250 S250 S250 S250 S250 S250 S250 S250 S250

static int deep; /* threads waiting at the bottom of their stacks */
int *volatile nowhere = 0;

__attribute__((noinline)) int wait_deep(int n) __asm__("wait_" S4000);
__attribute__((noinline)) int wait_deep(int n) {
    if (n == 0) {
        __atomic_add_fetch(&deep, 1, __ATOMIC_SEQ_CST);
        pause();
        return 0;
    }
    return wait_deep(n - 1) + 1;
}

static void *waiter(void *arg) {
    (void)arg;
    wait_deep(240);
    return NULL;
}

__attribute__((noinline)) void crash_wide(volatile int *p) { *p = 42; }

int main(void) {
    pthread_t t;
    for (int i = 0; i < 64; i++)
        pthread_create(&t, NULL, waiter, NULL);
    while (__atomic_load_n(&deep, __ATOMIC_SEQ_CST) < 64)
        usleep(1000);
    crash_wide(nowhere);
    return 0;
}
