/* A crash in a function whose ELF symbol is not UTF-8 (bytes 0xff 0xfe): drgn's and gdb's Python
 * decode names strictly. Built without debug info, so every back-end names the frame by this symbol. */
int *volatile nowhere = 0;
__attribute__((noinline)) void crash_in(volatile int *p) __asm__("crash_\xff\xfe_bad");
__attribute__((noinline)) void crash_in(volatile int *p) { *p = 42; }
int main(void) { crash_in(nowhere); return 0; }
