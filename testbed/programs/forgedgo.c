/* A program that passes for Go to its reader and forges a signal frame that points back at
 * itself: the kernel's saved state, at the "return address" of Go's signal restorer, names
 * the faulting instruction and the very stack it faults on. An unwinder that follows Go's
 * signal frames without a bound walks it forever. */
#include <stdint.h>

/* the names Go's runtime gives its outermost frame and its signal restorer */
__asm__(".text\n"
        ".globl runtime.goexit\n.type runtime.goexit,@function\nruntime.goexit:\n ret\n.size runtime.goexit,1\n"
        ".globl runtime.sigreturn\n.type runtime.sigreturn,@function\nruntime.sigreturn:\n hlt\n"
        ".size runtime.sigreturn,1\n");
extern char sigreturn_label[] __asm__("runtime.sigreturn");

__attribute__((noinline)) void fault_here(void) { *(volatile int *)0 = 0; }

enum { UC_MCONTEXT = 5, RSP = UC_MCONTEXT + 15, RIP = UC_MCONTEXT + 16 };

int main(void) {
    static uint64_t stack[4096] __attribute__((aligned(16)));
    uint64_t *top = &stack[2048];
    top[0] = (uint64_t)sigreturn_label; /* fault_here's "return address" */
    uint64_t *uc = &top[1];             /* the ucontext the restorer would return through */
    uc[RSP] = (uint64_t)top;
    uc[RIP] = (uint64_t)fault_here;
    __asm__ volatile("mov %0, %%rsp\n jmp fault_here" : : "r"(top) : "memory");
    return 0;
}
