/* Two tenants' programs that claim one build-id (chosen at link time with --build-id=0x…).
 *   tenant            victim_parse() dereferences NULL: tenant B's own program
 *   tenant (-DFORGED) pwned_by_tenant_a() does: tenant A's forgery of B's build-id
 *   tenant map FILE…  map each FILE (a shared object, say) from offset 0, then crash as above
 */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

int *volatile nowhere = NULL;

#ifdef FORGED
__attribute__((noinline)) void pwned_by_tenant_a(volatile int *p) { *p = 666; }
#define CRASH pwned_by_tenant_a
#else
__attribute__((noinline)) void victim_parse(volatile int *p) { *p = 42; }
#define CRASH victim_parse
#endif

int main(int argc, char **argv) {
    for (int i = 2; argc > 2 && i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) || mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED) {
            perror(argv[i]);
            return 2;
        }
        close(fd); /* the mapping stays: thousands of files fit within the open-file limit */
    }
    CRASH(nowhere);
    return 0;
}
