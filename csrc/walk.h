/* The lstat walk that fixes a layer's entries, order and exact size
 * before any file content is read. */
#ifndef FASTLAYER_WALK_H
#define FASTLAYER_WALK_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Paths are kept once: an entry holds its suffix below its root; the path
 * on disk and the archive name are the root's forms plus that suffix. */
typedef struct {
    uint64_t rel_off;  /* the suffix below the root (empty for the root), in the blob */
    uint64_t link_off; /* symlink target, in the blob (symlinks only) */
    uint32_t root, rel_len, link_len;
    uint32_t mode;     /* st_mode as lstat gave it, or forced for synthetic dirs */
    uint64_t size;     /* data bytes (regular files) */
    uint64_t dev, ino;
    int64_t mtime_ns;  /* to notice a file that changes before or while read */
    char type;         /* tar type flag: '0' file, '2' symlink, '5' directory */
} fl_entry;

typedef struct {
    uint64_t fs_off, arc_off; /* in the blob */
    uint32_t fs_len, arc_len;
} fl_root;

typedef struct {
    char *blob;
    size_t blob_len, blob_cap;
    fl_entry *ents;
    size_t n, cap;
    fl_root *roots;
    size_t nroots, roots_cap;
    int privileged; /* euid 0: every file is readable */
    char err[8192];
} fl_walk;

void fl_walk_init(fl_walk *w);
void fl_walk_free(fl_walk *w);

/* A directory entry that exists only in the archive (e.g. /nix, /nix/store). */
int fl_walk_add_dir(fl_walk *w, const char *arc, size_t arc_len, uint32_t mode);

/* Add fs_path (as arc) and, unless it is a symlink, everything below it in
 * component-wise Python str order; symlinked directories are not entered.
 * Returns 0, or -1 with a one-line message in w->err. */
int fl_walk_root(fl_walk *w, const char *fs, size_t fs_len, const char *arc, size_t arc_len);

/* An entry's path on disk / name in the archive, into buf (FL_PATH_MAX);
 * returns its length (buf is NUL-terminated). */
#define FL_PATH_MAX 16384
size_t fl_entry_fs(const fl_walk *w, const fl_entry *e, char *buf);
size_t fl_entry_arc(const fl_walk *w, const fl_entry *e, char *buf);

#endif
