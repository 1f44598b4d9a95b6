/* A crash in a function whose ELF symbol is 1 MiB long (string literals concatenated into the
 * assembler name). Built without debug info, so every back-end names the frame by this symbol. */
#define S16 "AAAAAAAAAAAAAAAA"
#define S256 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16 S16
#define S4K S256 S256 S256 S256 S256 S256 S256 S256 S256 S256 S256 S256 S256 S256 S256 S256
#define S64K S4K S4K S4K S4K S4K S4K S4K S4K S4K S4K S4K S4K S4K S4K S4K S4K
#define S1M S64K S64K S64K S64K S64K S64K S64K S64K S64K S64K S64K S64K S64K S64K S64K S64K
int *volatile nowhere = 0;
__attribute__((noinline)) void crash_in(volatile int *p) __asm__("crash_" S1M);
__attribute__((noinline)) void crash_in(volatile int *p) { *p = 42; }
int main(void) { crash_in(nowhere); return 0; }
