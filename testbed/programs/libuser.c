/* Calls into libcrashy.so, which crashes. */
int crashy_entry(const char *input);

int main(int argc, char **argv) { return crashy_entry(argc > 1 ? argv[1] : "input"); }
