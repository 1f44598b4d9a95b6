/* A shared library that crashes: for frames in a library that is not libc. */
int *volatile crashy_nowhere = 0;

__attribute__((noinline)) int crashy_parse(const char *input) {
    (void)input;
    return *crashy_nowhere;
}

int crashy_entry(const char *input) { return crashy_parse(input) + 1; }
