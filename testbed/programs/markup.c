/* A crash in a function whose symbol name is console markup, a terminal escape, a right-to-left
 * override and a zero-width space (UTF-8).
 * Built without debug info, so every back-end names the frame by this ELF symbol. */
int *volatile nowhere = 0;
__attribute__((noinline)) void crash_in(volatile int *p) __asm__("\"crash[/red][bold]\x1b[2J\xe2\x80\xae\xe2\x80\x8b\"");
__attribute__((noinline)) void crash_in(volatile int *p) { *p = 42; }
int main(void) { crash_in(nowhere); return 0; }
