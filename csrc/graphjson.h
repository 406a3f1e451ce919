/* A strict, narrow JSON reader for closure graphs: parses the well-formed
 * common case straight into columns and interned ids, and gives up (FG_OTHER)
 * on anything else, so the caller's general loader can say what is wrong. */
#ifndef FASTLAYER_GRAPHJSON_H
#define FASTLAYER_GRAPHJSON_H

#include <stddef.h>
#include <stdint.h>

#define FG_OK 0
#define FG_OTHER 1  /* not for the fast path: use the general loader */
#define FG_NOMEM -1

/* Distinct strings, numbered in first-seen order, bytes in one arena (each
 * string preceded by its id, so a probe that matches finds both in one line). */
typedef struct {
    uint64_t hash;
    uint64_t loc; /* arena offset of the string << 24 | its length; 0 = empty */
} fg_slot;

typedef struct {
    uint64_t *off;
    uint32_t *len;
    size_t n, cap;
    fg_slot *slots;
    size_t nslots;
} fg_intern;

typedef struct {
    char *arena;
    size_t arena_len, arena_cap;
    fg_intern names;    /* paths and references */
    fg_intern topkeys;  /* keys of a top-level object (repeats are left to Python) */
    /* per node, in file order */
    size_t n, cap;
    int32_t *path_id;
    int64_t *nar_size;
    int64_t *closure_size; /* -1: none */
    int64_t *hash_off, *drv_off; /* -1: None */
    uint32_t *hash_len, *drv_len;
    int64_t *ref_count;
    int32_t *refs; /* name ids */
    size_t nrefs, refs_cap;
    int32_t *listed; /* closureInfo: name ids of store-paths */
    size_t nlisted, listed_cap;
    int all_closure;
    /* inputs */
    const char *store_dir; /* prefixed to base names (path-info dict form) */
    size_t store_dir_len;
    const char *check_prefix; /* every path is check_prefix + one name */
    size_t check_prefix_len;
    const unsigned char *base; /* for dropping pages already parsed */
    size_t base_len, dropped;
    char *tmp;
    size_t tmp_cap;
    uint64_t seed; /* of the string hash */
} fg_graph;

void fg_init(fg_graph *g);
void fg_free(fg_graph *g);

/* Parse buf (a whole file). madv: buf is private memory the caller discards
 * afterwards, whose pages behind the parser may be dropped (zeroed) as it goes.
 * key: the attrs key, or NULL. */
int fg_parse(fg_graph *g, const unsigned char *buf, size_t len, const char *key, size_t key_len,
             int madv);

/* Parse the first len bytes of the regular file fd, mapped rather than read.
 * FG_OTHER also when the file shrinks while parsed. */
int fg_parse_fd(fg_graph *g, int fd, size_t len, const char *key, size_t key_len);

/* A closureInfo: `registration` (nix-store --load-db records) into the nodes,
 * `store-paths` (whitespace-separated) into `listed`. */
int fg_parse_closure_info(fg_graph *g, const unsigned char *reg, size_t reg_len,
                          const unsigned char *sp, size_t sp_len);

#endif
