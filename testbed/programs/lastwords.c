/* A program that chooses its own last words to attack whoever reads them:
 *   lastwords hostile   fails an assert whose text is 64 KiB of markup and terminal escapes
 */
#include <assert.h>
#include <stdlib.h>
#include <string.h>

__attribute__((noinline)) static void say_goodbye(void) {
    static char words[65536];
    const char *head = "<script>alert('pwned')</script>\x1b]0;pwned\x07\x1b[2J<b>";
    strcpy(words, head);
    memset(words + strlen(head), 'A', sizeof words - strlen(head) - 1);
    __assert_fail(words, "<i>evil.c</i>", 1, "say_goodbye");
}

int main(void) {
    say_goodbye();
    return 0;
}
