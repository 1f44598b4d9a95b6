/* fsmount TYPE SOURCE TARGET: mount(2) SOURCE on TARGET as TYPE, read-only, with no helper.
 *
 * busybox's mount sets up a loop device for a SOURCE that is a regular file; a pod with
 * CAP_SYS_ADMIN and no loop device mounts an erofs image file directly (the kernel reads the
 * file itself, CONFIG_EROFS_FS_BACKED_BY_FILE), which is what this is for.
 */
#include <stdio.h>
#include <sys/mount.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: fsmount TYPE SOURCE TARGET\n");
        return 2;
    }
    if (mount(argv[2], argv[3], argv[1], MS_RDONLY, NULL) != 0) {
        perror("mount");
        return 1;
    }
    return 0;
}
