/* A crash in a function whose symbol name is console markup and a terminal escape.
 * Built without debug info, so every back-end names the frame by this ELF symbol. */
int *volatile nowhere = 0;
__attribute__((noinline)) void crash_in(volatile int *p) __asm__("\"crash[/red][bold]\x1b[2J\"");
__attribute__((noinline)) void crash_in(volatile int *p) { *p = 42; }
int main(void) { crash_in(nowhere); return 0; }
