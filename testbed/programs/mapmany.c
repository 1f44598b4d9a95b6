/* Maps the first page of every file in a directory (argv[1], default /app/many), then crashes:
 * a process with as many distinct ELF objects mapped as the directory holds copies of one. */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/app/many";
    DIR *d = opendir(dir);
    if (!d) { perror(dir); return 2; }
    char path[4096];
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0 || mmap(NULL, 4096, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED) { perror(path); return 2; }
        close(fd);
        n++;
    }
    closedir(d);
    *(volatile int *)0 = n;
    return 0;
}
