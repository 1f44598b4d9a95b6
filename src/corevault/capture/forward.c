/* corevault-forward: the kernel's pipe handler on nodes where corevault runs as a DaemonSet.
 *
 * The kernel starts pipe handlers in the host's initial mount namespace, where the node may
 * have no Python at all (Container-Optimized OS, Bottlerocket, Talos). This program is linked
 * statically, needs nothing from the host, and does one thing: it hands the crash to the node
 * agent over a Unix socket (systemd-coredump's two-stage design), and exits.
 *
 *   corevault-forward SOCKET %P %p %i %I %s %t %d %u %g %c %C %h %e %f %E %F
 *
 * Message: a 4-byte length and the NUL-separated arguments, with fd 0 (the core) and the
 * pidfd (the %F fd, when there is one) attached as SCM_RIGHTS. The passed fd is the same open
 * pipe as fd 0: the kernel holds the crashed process (and /proc/%P with it, core_pipe_limit > 0)
 * until every copy of the pipe's read end is closed, so once the message is sent, whether in
 * flight or received, the agent's copy alone keeps the process, and the agent lets it go as soon
 * as it has read the core, as the coredump socket does. Waiting here for the agent instead (as
 * this program did) held the process, and the kernel's core_pipe_limit slot, until the agent had
 * also stored the binaries and the spool entry, and cost one more wake-up of this process. If the
 * agent cannot be reached the crash is lost, and the program says so on the kernel log;
 * RLIMIT_CORE stays 1 so that a crash in here is never dumped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_MESSAGE 65536

static void kmsg(const char *what) {
    int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        char line[512];
        int n = snprintf(line, sizeof line, "<3>corevault-forward: %s: %s\n", what, strerror(errno));
        if (n > 0) (void)!write(fd, line, (size_t)n);
        close(fd);
    }
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    static char message[MAX_MESSAGE];
    size_t used = 4;
    for (int i = 2; i < argc; i++) {
        size_t n = strlen(argv[i]) + 1;
        if (used + n > sizeof message) return 2;
        memcpy(message + used, argv[i], n);
        used += n;
    }
    unsigned int length = (unsigned int)(used - 4);
    memcpy(message, &length, 4);

    int fds[2] = {0, -1};
    const char *pidfd_arg = argv[argc - 1]; /* %F is the last argument */
    char *end = NULL;
    long pidfd = strtol(pidfd_arg, &end, 10);
    if (*pidfd_arg && end && *end == '\0' && pidfd > 2) fds[1] = (int)pidfd;
    int nfds = fds[1] >= 0 ? 2 : 1;

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (sock < 0 || strlen(argv[1]) >= sizeof addr.sun_path) return 1;
    strcpy(addr.sun_path, argv[1]);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        kmsg("cannot reach the corevault agent; this crash's core is lost");
        return 1;
    }

    union {
        char buf[CMSG_SPACE(sizeof(int) * 2)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = message, .iov_len = used};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds)};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) != (ssize_t)used) {
        kmsg("cannot hand the crash to the corevault agent");
        return 1;
    }
    return 0; /* the agent holds the core's pipe now (see above) */
}
