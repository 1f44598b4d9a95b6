/* A crash in a function whose symbol name is chat markup and HTML: a Slack mention, a link and a tag.
 * Built without debug info, so every back-end names the frame by this ELF symbol. */
int *volatile nowhere = 0;
__attribute__((noinline)) void crash_in(volatile int *p) __asm__("\"crash<!channel><https://evil.example/x|click><img/src=x>\"");
__attribute__((noinline)) void crash_in(volatile int *p) { *p = 42; }
int main(void) { crash_in(nowhere); return 0; }
