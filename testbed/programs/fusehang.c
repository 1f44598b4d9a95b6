/* fusehang MOUNTPOINT OPCODE: a FUSE server on raw /dev/fuse that reads every request of
 * OPCODE ("write", "fsync", "opendir", ...) and never answers it.
 *
 * A stopped server (SIGSTOP) never reads a request, and a wait for a request still unread ends
 * on a fatal signal: a pipe handler's writer stuck on it ends with the handler's process. A
 * request the server has read is waited for uninterruptibly until it answers or the connection
 * is aborted, whatever signal comes. This server answers everything else (an in-memory tree of
 * directories and files whose data it drops) so that a writer gets as far as OPCODE, and from
 * then on it reads and keeps every request of OPCODE unanswered, as a server that hangs does.
 *
 * It mounts itself (mount(2) with the fd option: CAP_SYS_ADMIN and /dev/fuse, as a pod with its
 * own FUSE server has them), says "mounted" on stdout and serves until the connection ends
 * (unmounted, or aborted through /sys/fs/fuse/connections/N/abort).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_NODES 256
#define MAX_WRITE (128 * 1024)

struct inode { int used; uint32_t mode, uid, gid, nlink; uint64_t size; };
struct dent { int used; uint64_t parent, ino; char name[256]; };

static struct inode inodes[MAX_NODES];
static struct dent dents[MAX_NODES];
static int dev_fd;
static uint32_t hang_opcode;

static const struct { const char *name; uint32_t opcode; } OPCODES[] = {
    {"lookup", FUSE_LOOKUP}, {"getattr", FUSE_GETATTR}, {"setattr", FUSE_SETATTR},
    {"mkdir", FUSE_MKDIR}, {"unlink", FUSE_UNLINK}, {"rename", FUSE_RENAME}, {"rename2", FUSE_RENAME2}, {"link", FUSE_LINK},
    {"open", FUSE_OPEN}, {"write", FUSE_WRITE}, {"fsync", FUSE_FSYNC}, {"flush", FUSE_FLUSH},
    {"release", FUSE_RELEASE}, {"opendir", FUSE_OPENDIR}, {"create", FUSE_CREATE},
    {"statfs", FUSE_STATFS},
};

static void reply(uint64_t unique, int error, const void *a, size_t alen, const void *b, size_t blen) {
    struct fuse_out_header out = {.len = sizeof(out) + alen + blen, .error = -error, .unique = unique};
    struct iovec iov[3] = {{&out, sizeof(out)}, {(void *)a, alen}, {(void *)b, blen}};
    if (writev(dev_fd, iov, 3) < 0 && errno != ENOENT) /* ENOENT: the request was interrupted */
        perror("fusehang: writev");
}

static void attr_of(uint64_t ino, struct fuse_attr *attr) {
    struct inode *n = &inodes[ino];
    memset(attr, 0, sizeof(*attr));
    attr->ino = ino;
    attr->size = n->size;
    attr->blocks = (n->size + 511) / 512;
    attr->mode = n->mode;
    attr->nlink = n->nlink;
    attr->uid = n->uid;
    attr->gid = n->gid;
    attr->blksize = 4096;
}

static void reply_entry(uint64_t unique, uint64_t ino, const struct fuse_open_out *open) {
    struct fuse_entry_out e = {.nodeid = ino, .generation = 1, .entry_valid = 3600, .attr_valid = 3600};
    attr_of(ino, &e.attr);
    reply(unique, 0, &e, sizeof(e), open, open ? sizeof(*open) : 0);
}

static struct dent *find(uint64_t parent, const char *name) {
    for (int i = 0; i < MAX_NODES; i++)
        if (dents[i].used && dents[i].parent == parent && strcmp(dents[i].name, name) == 0)
            return &dents[i];
    return NULL;
}

static int add_dent(uint64_t parent, const char *name, uint64_t ino) {
    if (strlen(name) >= sizeof(dents[0].name))
        return ENAMETOOLONG;
    for (int i = 0; i < MAX_NODES; i++)
        if (!dents[i].used) {
            dents[i] = (struct dent){.used = 1, .parent = parent, .ino = ino};
            strcpy(dents[i].name, name);
            inodes[ino].nlink++;
            return 0;
        }
    return ENOSPC;
}

static void drop_dent(struct dent *d) {
    d->used = 0;
    if (--inodes[d->ino].nlink == 0)
        inodes[d->ino].used = 0;
}

/* a new inode named NAME in PARENT: its number, or 0 with *err set */
static uint64_t make(uint64_t parent, const char *name, uint32_t mode, int *err) {
    if (find(parent, name)) {
        *err = EEXIST;
        return 0;
    }
    for (uint64_t ino = 2; ino < MAX_NODES; ino++)
        if (!inodes[ino].used) {
            inodes[ino] = (struct inode){.used = 1, .mode = mode};
            if ((*err = add_dent(parent, name, ino)) != 0) {
                inodes[ino].used = 0;
                return 0;
            }
            return ino;
        }
    *err = ENOSPC;
    return 0;
}

static int valid(uint64_t ino) { return ino > 0 && ino < MAX_NODES && inodes[ino].used; }

static void serve(struct fuse_in_header *in, char *arg) {
    uint64_t u = in->unique, node = in->nodeid;
    struct fuse_open_out open = {.fh = 1};
    int err = 0;
    if (in->opcode == FUSE_FORGET || in->opcode == FUSE_BATCH_FORGET || in->opcode == FUSE_INTERRUPT)
        return; /* never answered, by the protocol (an interrupt of a hung request stays unanswered) */
    if (in->opcode == hang_opcode) { /* read, and never answered */
        printf("hanging\n");
        fflush(stdout);
        return;
    }
    if (in->opcode != FUSE_INIT && in->opcode != FUSE_DESTROY && in->opcode != FUSE_STATFS && !valid(node)) {
        reply(u, ENOENT, NULL, 0, NULL, 0);
        return;
    }
    switch (in->opcode) {
    case FUSE_INIT: {
        struct fuse_init_in *init = (void *)arg;
        struct fuse_init_out out = {
            .major = FUSE_KERNEL_VERSION,
            .minor = init->minor < FUSE_KERNEL_MINOR_VERSION ? init->minor : FUSE_KERNEL_MINOR_VERSION,
            .max_readahead = init->max_readahead, .max_background = 16, .congestion_threshold = 12,
            .max_write = MAX_WRITE, .time_gran = 1,
        };
        reply(u, 0, &out, sizeof(out), NULL, 0);
        return;
    }
    case FUSE_DESTROY:
        reply(u, 0, NULL, 0, NULL, 0);
        exit(0);
    case FUSE_LOOKUP: {
        struct dent *d = find(node, arg);
        if (d)
            reply_entry(u, d->ino, NULL);
        else
            reply(u, ENOENT, NULL, 0, NULL, 0);
        return;
    }
    case FUSE_GETATTR: {
        struct fuse_attr_out out = {.attr_valid = 3600};
        attr_of(node, &out.attr);
        reply(u, 0, &out, sizeof(out), NULL, 0);
        return;
    }
    case FUSE_SETATTR: {
        struct fuse_setattr_in *set = (void *)arg;
        struct fuse_attr_out out = {.attr_valid = 3600};
        if (set->valid & FATTR_MODE)
            inodes[node].mode = (inodes[node].mode & S_IFMT) | (set->mode & 07777);
        if (set->valid & FATTR_UID)
            inodes[node].uid = set->uid;
        if (set->valid & FATTR_GID)
            inodes[node].gid = set->gid;
        if (set->valid & FATTR_SIZE)
            inodes[node].size = set->size;
        attr_of(node, &out.attr);
        reply(u, 0, &out, sizeof(out), NULL, 0);
        return;
    }
    case FUSE_MKDIR: {
        struct fuse_mkdir_in *mk = (void *)arg;
        uint64_t ino = make(node, arg + sizeof(*mk), S_IFDIR | (mk->mode & 07777), &err);
        if (ino) {
            inodes[ino].nlink++; /* its "." */
            reply_entry(u, ino, NULL);
        } else {
            reply(u, err, NULL, 0, NULL, 0);
        }
        return;
    }
    case FUSE_CREATE: {
        struct fuse_create_in *cr = (void *)arg;
        uint64_t ino = make(node, arg + sizeof(*cr), S_IFREG | (cr->mode & 07777), &err);
        if (ino)
            reply_entry(u, ino, &open);
        else
            reply(u, err, NULL, 0, NULL, 0);
        return;
    }
    case FUSE_LINK: {
        struct fuse_link_in *ln = (void *)arg;
        if (!valid(ln->oldnodeid))
            err = ENOENT;
        else if (find(node, arg + sizeof(*ln)))
            err = EEXIST;
        else
            err = add_dent(node, arg + sizeof(*ln), ln->oldnodeid);
        if (err)
            reply(u, err, NULL, 0, NULL, 0);
        else
            reply_entry(u, ln->oldnodeid, NULL);
        return;
    }
    case FUSE_UNLINK:
    case FUSE_RMDIR: {
        struct dent *d = find(node, arg);
        if (d)
            drop_dent(d);
        reply(u, d ? 0 : ENOENT, NULL, 0, NULL, 0);
        return;
    }
    case FUSE_RENAME:
    case FUSE_RENAME2: {
        struct fuse_rename2_in plain = {.newdir = ((struct fuse_rename_in *)arg)->newdir}, *rn = &plain;
        const char *from = arg + sizeof(struct fuse_rename_in), *to;
        if (in->opcode == FUSE_RENAME2) {
            rn = (void *)arg;
            from = arg + sizeof(*rn);
        }
        to = from + strlen(from) + 1;
        struct dent *d = find(node, from), *there = find(rn->newdir, to);
        if (!d || !valid(rn->newdir))
            err = ENOENT;
        else if (there && (rn->flags & RENAME_NOREPLACE))
            err = EEXIST;
        else if (rn->flags & ~RENAME_NOREPLACE)
            err = EINVAL;
        else if (strlen(to) >= sizeof(d->name))
            err = ENAMETOOLONG;
        if (!err) {
            if (there && there != d)
                drop_dent(there);
            d->parent = rn->newdir;
            strcpy(d->name, to);
        }
        reply(u, err, NULL, 0, NULL, 0);
        return;
    }
    case FUSE_OPEN:
    case FUSE_OPENDIR:
        reply(u, 0, &open, sizeof(open), NULL, 0);
        return;
    case FUSE_READ: /* the data is dropped: a file reads as empty */
    case FUSE_READDIR:
    case FUSE_RELEASE:
    case FUSE_RELEASEDIR:
    case FUSE_FLUSH:
    case FUSE_FSYNC:
    case FUSE_FSYNCDIR:
        reply(u, 0, NULL, 0, NULL, 0);
        return;
    case FUSE_WRITE: {
        struct fuse_write_in *w = (void *)arg;
        struct fuse_write_out out = {.size = w->size};
        if (w->offset + w->size > inodes[node].size)
            inodes[node].size = w->offset + w->size;
        reply(u, 0, &out, sizeof(out), NULL, 0);
        return;
    }
    case FUSE_STATFS: {
        struct fuse_statfs_out out = {
            .st = {.blocks = 1 << 20, .bfree = 1 << 20, .bavail = 1 << 20, .files = MAX_NODES,
                   .ffree = MAX_NODES, .bsize = 4096, .namelen = 255, .frsize = 4096}};
        reply(u, 0, &out, sizeof(out), NULL, 0);
        return;
    }
    default: /* the kernel falls back, or fails the call (O_TMPFILE, xattrs, access, locks...) */
        reply(u, ENOSYS, NULL, 0, NULL, 0);
    }
}

int main(int argc, char **argv) {
    static char buf[MAX_WRITE + 4096 + FUSE_MIN_READ_BUFFER];
    char opts[128];
    size_t i;
    if (argc != 3) {
        fprintf(stderr, "usage: fusehang MOUNTPOINT OPCODE\n");
        return 2;
    }
    for (i = 0; i < sizeof(OPCODES) / sizeof(OPCODES[0]); i++)
        if (strcmp(argv[2], OPCODES[i].name) == 0)
            hang_opcode = OPCODES[i].opcode;
    if (!hang_opcode) {
        fprintf(stderr, "fusehang: unknown opcode %s\n", argv[2]);
        return 2;
    }
    inodes[FUSE_ROOT_ID] = (struct inode){.used = 1, .mode = S_IFDIR | 0755, .nlink = 2};
    dev_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (dev_fd < 0) {
        perror("fusehang: /dev/fuse");
        return 1;
    }
    snprintf(opts, sizeof(opts), "fd=%d,rootmode=40000,user_id=0,group_id=0", dev_fd);
    if (mount("fusehang", argv[1], "fuse.fusehang", MS_NOSUID | MS_NODEV, opts) != 0) {
        perror("fusehang: mount");
        return 1;
    }
    printf("mounted\n");
    fflush(stdout);
    for (;;) {
        ssize_t n = read(dev_fd, buf, sizeof(buf));
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            if (errno != ENODEV) /* ENODEV: unmounted, or aborted */
                perror("fusehang: read");
            return errno == ENODEV ? 0 : 1;
        }
        if ((size_t)n < sizeof(struct fuse_in_header))
            continue;
        serve((struct fuse_in_header *)buf, buf + sizeof(struct fuse_in_header));
    }
}
