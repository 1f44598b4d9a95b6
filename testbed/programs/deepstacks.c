/* A stack built to cost its reader: four threads wait 5,000 calls deep, then the main
 * thread overflows its stack through two functions that call each other, so no run of one
 * function repeats and a report that named every run would be as long as the stack. */
#include <pthread.h>
#include <unistd.h>

static int pong(int n);
static int deep; /* threads waiting at the bottom of their stacks */

__attribute__((noinline)) static int ping(int n) { return pong(n + 1) + 1; }

__attribute__((noinline)) static int pong(int n) { return ping(n + 1) + 1; }

__attribute__((noinline)) static int wait_deep(int n) {
    if (n == 0) {
        __atomic_add_fetch(&deep, 1, __ATOMIC_SEQ_CST);
        pause();
        return 0;
    }
    return wait_deep(n - 1) + 1;
}

static void *waiter(void *arg) {
    (void)arg;
    wait_deep(5000);
    return NULL;
}

int main(void) {
    pthread_t t;
    for (int i = 0; i < 4; i++)
        pthread_create(&t, NULL, waiter, NULL);
    while (__atomic_load_n(&deep, __ATOMIC_SEQ_CST) < 4)
        usleep(1000);
    return ping(0);
}
