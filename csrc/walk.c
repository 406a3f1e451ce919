#include "walk.h"

#include "tarhdr.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATHBUF FL_PATH_MAX

void fl_walk_init(fl_walk *w)
{
    memset(w, 0, sizeof *w);
    w->privileged = geteuid() == 0;
}

void fl_walk_free(fl_walk *w)
{
    free(w->blob);
    free(w->ents);
    free(w->roots);
    memset(w, 0, sizeof *w);
}

static int fail(fl_walk *w, const char *what, const char *path, int err)
{
    snprintf(w->err, sizeof w->err, "%s %s: %s", what, path, strerror(err));
    return -1;
}

static int blob_put(fl_walk *w, const char *s, size_t n, uint64_t *off)
{
    if (w->blob_len + n + 1 > w->blob_cap) {
        size_t cap = w->blob_cap ? w->blob_cap : 1 << 16;
        while (cap < w->blob_len + n + 1) cap *= 2;
        char *b = realloc(w->blob, cap);
        if (!b) return fail(w, "out of memory at", "walk", ENOMEM);
        w->blob = b;
        w->blob_cap = cap;
    }
    memcpy(w->blob + w->blob_len, s, n);
    w->blob[w->blob_len + n] = 0;
    *off = w->blob_len;
    w->blob_len += n + 1;
    return 0;
}

static fl_entry *new_entry(fl_walk *w)
{
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 1024;
        fl_entry *e = realloc(w->ents, cap * sizeof *e);
        if (!e) {
            fail(w, "out of memory at", "walk", ENOMEM);
            return NULL;
        }
        w->ents = e;
        w->cap = cap;
    }
    fl_entry *e = &w->ents[w->n++];
    memset(e, 0, sizeof *e);
    return e;
}

static int new_root(fl_walk *w, const char *fs, size_t fs_len, const char *arc, size_t arc_len)
{
    if (w->nroots == w->roots_cap) {
        size_t cap = w->roots_cap ? w->roots_cap * 2 : 16;
        fl_root *r = realloc(w->roots, cap * sizeof *r);
        if (!r) return fail(w, "out of memory at", "walk", ENOMEM);
        w->roots = r;
        w->roots_cap = cap;
    }
    fl_root *r = &w->roots[w->nroots];
    if (blob_put(w, fs, fs_len, &r->fs_off) || blob_put(w, arc, arc_len, &r->arc_off)) return -1;
    r->fs_len = (uint32_t)fs_len;
    r->arc_len = (uint32_t)arc_len;
    w->nroots++;
    return 0;
}

static size_t join(const char *a, size_t alen, const char *b, size_t blen, char *buf)
{
    if (alen + blen + 1 > FL_PATH_MAX) blen = FL_PATH_MAX - 1 - alen; /* walk forbids it */
    memcpy(buf, a, alen);
    memcpy(buf + alen, b, blen);
    buf[alen + blen] = 0;
    return alen + blen;
}

size_t fl_entry_fs(const fl_walk *w, const fl_entry *e, char *buf)
{
    const fl_root *r = &w->roots[e->root];
    return join(w->blob + r->fs_off, r->fs_len, w->blob + e->rel_off, e->rel_len, buf);
}

size_t fl_entry_arc(const fl_walk *w, const fl_entry *e, char *buf)
{
    const fl_root *r = &w->roots[e->root];
    return join(w->blob + r->arc_off, r->arc_len, w->blob + e->rel_off, e->rel_len, buf);
}

int fl_walk_add_dir(fl_walk *w, const char *arc, size_t arc_len, uint32_t mode)
{
    if (new_root(w, "", 0, arc, arc_len)) return -1;
    fl_entry *e = new_entry(w);
    if (!e) return -1;
    e->type = '5';
    e->mode = S_IFDIR | (mode & 07777);
    e->root = (uint32_t)(w->nroots - 1);
    e->rel_len = 0;
    return blob_put(w, "", 0, &e->rel_off);
}

static const char *type_name(mode_t m)
{
    if (S_ISFIFO(m)) return "a fifo";
    if (S_ISSOCK(m)) return "a socket";
    if (S_ISCHR(m)) return "a character device";
    if (S_ISBLK(m)) return "a block device";
    return "of an unknown file type";
}

/* Record one lstat'ed object; dirfd/name locate it for readlink/access. */
static int add_entry(fl_walk *w, const struct stat *st, int dirfd, const char *name,
                     const char *fs, size_t fs_len, const char *arc, size_t arc_len)
{
    char type;
    if (S_ISREG(st->st_mode)) {
        /* Fail before the first byte is written rather than mid-stream
         * (root reads everything: skip the syscall there). */
        if (!w->privileged && faccessat(dirfd, name, R_OK, AT_EACCESS) != 0)
            return fail(w, "cannot read", fs, errno);
        type = '0';
    } else if (S_ISDIR(st->st_mode)) {
        type = '5';
    } else if (S_ISLNK(st->st_mode)) {
        type = '2';
    } else {
        snprintf(w->err, sizeof w->err,
                 "%s is %s; layers hold only files, directories and symlinks", fs,
                 type_name(st->st_mode));
        return -1;
    }
    fl_entry *e = new_entry(w);
    if (!e) return -1;
    e->type = type;
    e->mode = (uint32_t)st->st_mode;
    e->size = type == '0' ? (uint64_t)st->st_size : 0;
    e->dev = (uint64_t)st->st_dev;
    e->ino = (uint64_t)st->st_ino;
    e->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
    /* the suffix below the current root: the same in fs and arc */
    size_t root_len = w->roots[w->nroots - 1].fs_len;
    (void)arc;
    (void)arc_len;
    e->root = (uint32_t)(w->nroots - 1);
    e->rel_len = (uint32_t)(fs_len - root_len);
    if (blob_put(w, fs + root_len, fs_len - root_len, &e->rel_off)) return -1;
    if (type == '2') {
        char target[PATH_MAX + 1];
        ssize_t n = readlinkat(dirfd, name, target, sizeof target - 1);
        if (n < 0) return fail(w, "cannot read symlink", fs, errno);
        /* entries may have moved in blob_put's realloc: index, not pointer */
        fl_entry *cur = &w->ents[w->n - 1];
        cur->link_len = (uint32_t)n;
        if (blob_put(w, target, (size_t)n, &cur->link_off)) return -1;
    }
    return 0;
}

typedef struct {
    const char *name;
    size_t len;
    struct stat st;
} child;

static int child_cmp(const void *pa, const void *pb)
{
    const child *a = pa, *b = pb;
    return fl_pystr_cmp((const unsigned char *)a->name, a->len, (const unsigned char *)b->name,
                        b->len);
}

/* fs/arc hold the directory's path (with room to append); depth-first, each
 * directory's children sorted, which is exactly component-wise order. */
static int walk_dir(fl_walk *w, char *fs, size_t fs_len, char *arc, size_t arc_len)
{
    DIR *d = opendir(fs);
    if (!d) return fail(w, "cannot read directory", fs, errno);
    int dfd = dirfd(d);
    size_t n = 0, cap = 64, arena_len = 0, arena_cap = 4096;
    child *kids = malloc(cap * sizeof *kids);
    char *arena = malloc(arena_cap);
    int rc = 0;
    if (!kids || !arena) {
        rc = fail(w, "out of memory reading", fs, ENOMEM);
        goto out;
    }
    for (;;) {
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) rc = fail(w, "cannot read directory", fs, errno);
            break;
        }
        const char *nm = de->d_name;
        if (nm[0] == '.' && (nm[1] == 0 || (nm[1] == '.' && nm[2] == 0))) continue;
        size_t len = strlen(nm);
        if (arena_len + len + 1 > arena_cap) {
            while (arena_len + len + 1 > arena_cap) arena_cap *= 2;
            char *a = realloc(arena, arena_cap);
            if (!a) {
                rc = fail(w, "out of memory reading", fs, ENOMEM);
                goto out;
            }
            arena = a;
        }
        memcpy(arena + arena_len, nm, len + 1);
        if (n == cap) {
            cap *= 2;
            child *k = realloc(kids, cap * sizeof *kids);
            if (!k) {
                rc = fail(w, "out of memory reading", fs, ENOMEM);
                goto out;
            }
            kids = k;
        }
        kids[n].name = (const char *)(uintptr_t)arena_len; /* fixed up below */
        kids[n].len = len;
        n++;
        arena_len += len + 1;
    }
    if (rc) goto out;
    for (size_t i = 0; i < n; i++) kids[i].name = arena + (uintptr_t)kids[i].name;
    for (size_t i = 0; i < n; i++) {
        if (fstatat(dfd, kids[i].name, &kids[i].st, AT_SYMLINK_NOFOLLOW) != 0) {
            snprintf(w->err, sizeof w->err, "cannot stat %s/%s: %s", fs, kids[i].name,
                     strerror(errno));
            rc = -1;
            goto out;
        }
    }
    qsort(kids, n, sizeof *kids, child_cmp);
    for (size_t i = 0; i < n && rc == 0; i++) {
        size_t len = kids[i].len;
        if (fs_len + len + 2 > PATHBUF || arc_len + len + 2 > PATHBUF) {
            snprintf(w->err, sizeof w->err, "path too long: %s/%s", fs, kids[i].name);
            rc = -1;
            break;
        }
        fs[fs_len] = '/';
        memcpy(fs + fs_len + 1, kids[i].name, len + 1);
        arc[arc_len] = '/';
        memcpy(arc + arc_len + 1, kids[i].name, len + 1);
        rc = add_entry(w, &kids[i].st, dfd, kids[i].name, fs, fs_len + 1 + len, arc,
                       arc_len + 1 + len);
        if (rc == 0 && S_ISDIR(kids[i].st.st_mode))
            rc = walk_dir(w, fs, fs_len + 1 + len, arc, arc_len + 1 + len);
        fs[fs_len] = 0;
        arc[arc_len] = 0;
    }
out:
    free(kids);
    free(arena);
    closedir(d);
    return rc;
}

int fl_walk_root(fl_walk *w, const char *fs_in, size_t fs_len, const char *arc_in, size_t arc_len)
{
    if (fs_len + 2 > PATHBUF || arc_len + 2 > PATHBUF) {
        snprintf(w->err, sizeof w->err, "path too long: %.*s", (int)fs_len, fs_in);
        return -1;
    }
    char *fs = malloc(PATHBUF), *arc = malloc(PATHBUF);
    int rc = -1;
    if (!fs || !arc) {
        fail(w, "out of memory at", fs_in, ENOMEM);
        goto out;
    }
    memcpy(fs, fs_in, fs_len);
    fs[fs_len] = 0;
    memcpy(arc, arc_in, arc_len);
    arc[arc_len] = 0;
    struct stat st;
    if (lstat(fs, &st) != 0) {
        fail(w, "cannot stat", fs, errno);
        goto out;
    }
    if (new_root(w, fs, fs_len, arc, arc_len)) goto out;
    rc = add_entry(w, &st, AT_FDCWD, fs, fs, fs_len, arc, arc_len);
    if (rc == 0 && S_ISDIR(st.st_mode)) rc = walk_dir(w, fs, fs_len, arc, arc_len);
out:
    free(fs);
    free(arc);
    return rc;
}
