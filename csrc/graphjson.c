/* Closure graph JSON straight into columns (see graphjson.h).
 *
 * Accepts a strict subset of what Python's json module accepts and of what
 * fastlayer.graph's general loader turns into a graph without an error: kept
 * strings (paths, references, hashes, derivers, keys) are printable ASCII
 * without escapes, sizes are plain non-negative integers below 2^63, known keys
 * appear once per object. Anything else returns FG_OTHER before any result is
 * used, and the general loader then reads the file and names the culprit. */
#include "graphjson.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#define MAX_DEPTH 512
#define MAX_NUMBER 4000        /* Python refuses ints past 4300 digits */
#define DROP_EVERY (64u << 20) /* bytes parsed between page drops */

typedef struct {
    const unsigned char *p, *end;
    fg_graph *g;
} P;

#define TRY(x)                    \
    do {                          \
        int rc_ = (x);            \
        if (rc_) return rc_;      \
    } while (0)

/* --- memory -------------------------------------------------------------- */

static int grow(void **ptr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    void *q = realloc(*ptr, c * elem);
    if (!q) return FG_NOMEM;
    *ptr = q;
    *cap = c;
    return 0;
}

static int arena_put(fg_graph *g, const unsigned char *s, size_t len, uint64_t *off)
{
    if (g->arena_len + len > g->arena_cap) {
        size_t c = g->arena_cap ? g->arena_cap : (1u << 20);
        while (c < g->arena_len + len) c *= 2;
        char *a = realloc(g->arena, c);
        if (!a) return FG_NOMEM;
        g->arena = a;
        g->arena_cap = c;
    }
    memcpy(g->arena + g->arena_len, s, len);
    *off = g->arena_len;
    g->arena_len += len;
    return 0;
}

/* --- interning ------------------------------------------------------------ */

/* Seeded per parse (see fg_parse); a crafted file that still piles up probes
 * meets MAX_PROBES and goes to the general loader (SipHash dicts). */
static uint64_t hash_bytes(uint64_t seed, const unsigned char *s, size_t len)
{
    const uint64_t k = 0x9E3779B97F4A7C15ull;
    uint64_t h = seed ^ (len * k);
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        h = (h ^ w) * k;
        h ^= h >> 29;
    }
    uint64_t w = 0;
    memcpy(&w, s + i, len - i);
    h = (h ^ w) * k;
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    return h;
}

#define MAX_LEN ((1u << 24) - 1)
#define MAX_PROBES 256 /* at load <= 1/2, random hashes need a handful */

static int intern_rehash(fg_intern *t)
{
    size_t ns = t->nslots ? t->nslots * 2 : 4096;
    fg_slot *slots = calloc(ns, sizeof *slots);
    if (!slots) return FG_NOMEM;
    for (size_t i = 0; i < t->nslots; i++) {
        if (!t->slots[i].loc) continue;
        size_t j = t->slots[i].hash & (ns - 1);
        while (slots[j].loc) j = (j + 1) & (ns - 1);
        slots[j] = t->slots[i];
    }
    free(t->slots);
    t->slots = slots;
    t->nslots = ns;
    return 0;
}

/* The id of s, added if new; *fresh says which. A probe reads one slot and,
 * when the hash matches, the arena bytes right after the id: about two cache
 * misses per lookup in a table far larger than the caches. */
static int intern_h(fg_graph *g, fg_intern *t, const unsigned char *s, size_t len, uint64_t h,
                    int32_t *id, int *fresh)
{
    if (len > MAX_LEN || t->n >= INT32_MAX) return FG_OTHER;
    if ((t->n + 1) * 2 > t->nslots) TRY(intern_rehash(t));
    size_t j = h & (t->nslots - 1);
    uint64_t loc;
    size_t probes = 0;
    while ((loc = t->slots[j].loc) != 0) {
        if (++probes > MAX_PROBES) return FG_OTHER;
        if (t->slots[j].hash == h && (loc & MAX_LEN) == len) {
            const char *at = g->arena + (loc >> 24);
            if (memcmp(at, s, len) == 0) {
                int32_t v;
                memcpy(&v, at - sizeof v, sizeof v);
                *id = v;
                if (fresh) *fresh = 0;
                return 0;
            }
        }
        j = (j + 1) & (t->nslots - 1);
    }
    if (t->n == t->cap) {
        size_t c = t->cap ? t->cap * 2 : 4096;
        uint64_t *off = realloc(t->off, c * sizeof *off);
        if (!off) return FG_NOMEM;
        t->off = off;
        uint32_t *ln = realloc(t->len, c * sizeof *ln);
        if (!ln) return FG_NOMEM;
        t->len = ln;
        t->cap = c;
    }
    int32_t v = (int32_t)t->n;
    uint64_t o;
    TRY(arena_put(g, (const unsigned char *)&v, sizeof v, &o));
    TRY(arena_put(g, s, len, &o));
    if (o >= (1ull << 40)) return FG_OTHER;
    t->off[t->n] = o;
    t->len[t->n] = (uint32_t)len;
    t->slots[j].hash = h;
    t->slots[j].loc = (o << 24) | len;
    *id = (int32_t)t->n++;
    if (fresh) *fresh = 1;
    return 0;
}

static int intern(fg_graph *g, fg_intern *t, const unsigned char *s, size_t len, int32_t *id,
                  int *fresh)
{
    return intern_h(g, t, s, len, hash_bytes(g->seed, s, len), id, fresh);
}

/* References waiting to be interned together: their table slots and strings are
 * prefetched first, so the cache misses of one node's references overlap. */
#define BATCH 32
typedef struct {
    const unsigned char *s;
    size_t len;
    uint64_t h;
} pending;

static int flush_refs(fg_graph *g, pending *b, size_t k)
{
    fg_intern *t = &g->names;
    if (!k) return 0;
    if ((t->n + k + 1) * 2 > t->nslots) TRY(intern_rehash(t));
    size_t mask = t->nslots - 1;
    for (size_t i = 0; i < k; i++) {
        b[i].h = hash_bytes(g->seed, b[i].s, b[i].len);
        __builtin_prefetch(&t->slots[b[i].h & mask]);
    }
    for (size_t i = 0; i < k; i++) {
        const fg_slot *sl = &t->slots[b[i].h & mask];
        if (sl->hash == b[i].h) __builtin_prefetch(g->arena + (sl->loc >> 24));
    }
    TRY(grow((void **)&g->refs, &g->refs_cap, g->nrefs + k, sizeof *g->refs));
    for (size_t i = 0; i < k; i++)
        TRY(intern_h(g, t, b[i].s, b[i].len, b[i].h, &g->refs[g->nrefs++], NULL));
    return 0;
}

static void intern_free(fg_intern *t)
{
    free(t->off);
    free(t->len);
    free(t->slots);
    memset(t, 0, sizeof *t);
}

void fg_init(fg_graph *g)
{
    memset(g, 0, sizeof *g);
    if (getrandom(&g->seed, sizeof g->seed, GRND_NONBLOCK) != (ssize_t)sizeof g->seed)
        g->seed = (uint64_t)(uintptr_t)g ^ 0x243F6A8885A308D3ull; /* ASLR at least */
}

void fg_free(fg_graph *g)
{
    free(g->arena);
    intern_free(&g->names);
    intern_free(&g->topkeys);
    free(g->path_id);
    free(g->nar_size);
    free(g->closure_size);
    free(g->hash_off);
    free(g->drv_off);
    free(g->hash_len);
    free(g->drv_len);
    free(g->ref_count);
    free(g->refs);
    free(g->listed);
    free(g->tmp);
    memset(g, 0, sizeof *g);
}

/* --- lexing ---------------------------------------------------------------- */

static inline void ws(P *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t'))
        s->p++;
}

static inline int peek(P *s)
{
    ws(s);
    return s->p < s->end ? *s->p : -1;
}

static inline int expect(P *s, unsigned char c)
{
    if (peek(s) != c) return FG_OTHER;
    s->p++;
    return 0;
}

/* A string kept as it is: printable ASCII, no escapes. */
static int kept_string(P *s, const unsigned char **str, size_t *len)
{
    if (peek(s) != '"') return FG_OTHER;
    const unsigned char *a = ++s->p, *q = a;
    /* eight bytes at a time while none is '"', '\\', a control byte or past '~' */
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    while (s->end - q >= 8) {
        uint64_t w;
        memcpy(&w, q, 8);
        uint64_t quote = w ^ (ones * '"'), slash = w ^ (ones * '\\');
        uint64_t bad = ((quote - ones) & ~quote) | ((slash - ones) & ~slash) |
                       (w - ones * 0x20) | (w + ones * 0x01) | w;
        if (bad & highs) break;
        q += 8;
    }
    while (q < s->end && *q != '"') {
        if (*q < 0x20 || *q > 0x7e || *q == '\\') return FG_OTHER;
        q++;
    }
    if (q >= s->end) return FG_OTHER;
    *str = a;
    *len = (size_t)(q - a);
    s->p = q + 1;
    return 0;
}

/* Any valid string (escapes, UTF-8 without surrogates), skipped. */
static int skip_string(P *s)
{
    const unsigned char *q = s->p + 1, *e = s->end;
    for (;;) {
        if (q >= e) return FG_OTHER;
        unsigned char c = *q;
        if (c == '"') break;
        if (c < 0x20) return FG_OTHER;
        if (c == '\\') {
            if (q + 1 >= e) return FG_OTHER;
            c = q[1];
            if (c == 'u') {
                if (q + 6 > e) return FG_OTHER;
                for (int i = 2; i < 6; i++) {
                    unsigned char h = q[i];
                    if (!((h >= '0' && h <= '9') || (h >= 'a' && h <= 'f') ||
                          (h >= 'A' && h <= 'F')))
                        return FG_OTHER;
                }
                q += 6;
            } else if (strchr("\"\\/bfnrt", c) && c) {
                q += 2;
            } else {
                return FG_OTHER;
            }
            continue;
        }
        if (c < 0x80) {
            q++;
            continue;
        }
        size_t n;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) n = 1, cp = c & 0x1f;
        else if (c >= 0xe0 && c <= 0xef) n = 2, cp = c & 0x0f;
        else if (c >= 0xf0 && c <= 0xf4) n = 3, cp = c & 0x07;
        else return FG_OTHER;
        if (q + n >= e) return FG_OTHER;
        for (size_t i = 1; i <= n; i++) {
            if ((q[i] & 0xc0) != 0x80) return FG_OTHER;
            cp = (cp << 6) | (q[i] & 0x3f);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return FG_OTHER;
        q += n + 1;
    }
    s->p = q + 1;
    return 0;
}

static int skip_number(P *s)
{
    const unsigned char *a = s->p, *q = a, *e = s->end;
    if (q < e && *q == '-') q++;
    if (q >= e) return FG_OTHER;
    if (*q == '0') q++;
    else if (*q >= '1' && *q <= '9')
        while (q < e && *q >= '0' && *q <= '9') q++;
    else return FG_OTHER;
    if (q < e && *q == '.') {
        q++;
        if (q >= e || *q < '0' || *q > '9') return FG_OTHER;
        while (q < e && *q >= '0' && *q <= '9') q++;
    }
    if (q < e && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < e && (*q == '+' || *q == '-')) q++;
        if (q >= e || *q < '0' || *q > '9') return FG_OTHER;
        while (q < e && *q >= '0' && *q <= '9') q++;
    }
    if (q - a > MAX_NUMBER) return FG_OTHER;
    s->p = q;
    return 0;
}

static int literal(P *s, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return FG_OTHER;
    s->p += n;
    return 0;
}

static int skip_value(P *s, int depth)
{
    if (depth > MAX_DEPTH) return FG_OTHER;
    int c = peek(s);
    switch (c) {
    case '"':
        return skip_string(s);
    case '{':
        s->p++;
        if (peek(s) == '}') {
            s->p++;
            return 0;
        }
        for (;;) {
            if (peek(s) != '"') return FG_OTHER;
            TRY(skip_string(s));
            TRY(expect(s, ':'));
            TRY(skip_value(s, depth + 1));
            c = peek(s);
            s->p++;
            if (c == '}') return 0;
            if (c != ',') return FG_OTHER;
        }
    case '[':
        s->p++;
        if (peek(s) == ']') {
            s->p++;
            return 0;
        }
        for (;;) {
            TRY(skip_value(s, depth + 1));
            c = peek(s);
            s->p++;
            if (c == ']') return 0;
            if (c != ',') return FG_OTHER;
        }
    case 't':
        return literal(s, "true");
    case 'f':
        return literal(s, "false");
    case 'n':
        return literal(s, "null");
    default:
        if (c == '-' || (c >= '0' && c <= '9')) return skip_number(s);
        return FG_OTHER;
    }
}

/* null (-> -1) or an integer in [0, 2^63). */
static int size_value(P *s, int64_t *out)
{
    int c = peek(s);
    if (c == 'n') {
        *out = -1;
        return literal(s, "null");
    }
    const unsigned char *q = s->p, *e = s->end;
    if (c < '0' || c > '9' || (c == '0' && q + 1 < e && q[1] >= '0' && q[1] <= '9'))
        return FG_OTHER;
    uint64_t v = 0;
    while (q < e && *q >= '0' && *q <= '9') {
        if (v > (uint64_t)INT64_MAX / 10) return FG_OTHER;
        v = v * 10 + (uint64_t)(*q - '0');
        if (v > (uint64_t)INT64_MAX) return FG_OTHER;
        q++;
    }
    if (q < e && (*q == '.' || *q == 'e' || *q == 'E')) return FG_OTHER;
    s->p = q;
    *out = (int64_t)v;
    return 0;
}

/* null (-> -1) or a kept string, copied to the arena; empty_none: "" is None
 * too; prefix: the store dir, put before a base name. */
static int str_value(P *s, int empty_none, const char *prefix, size_t prefix_len, int64_t *off,
                     uint32_t *len)
{
    const unsigned char *str;
    size_t n;
    if (peek(s) == 'n') {
        *off = -1;
        return literal(s, "null");
    }
    TRY(kept_string(s, &str, &n));
    if (n == 0) { /* `deriver or None`; an empty hash stays "" */
        *off = empty_none ? -1 : (int64_t)s->g->arena_len;
        *len = 0;
        return 0;
    }
    uint64_t o;
    if (prefix && str[0] != '/') {
        TRY(arena_put(s->g, (const unsigned char *)prefix, prefix_len, &o));
        uint64_t o2;
        TRY(arena_put(s->g, (const unsigned char *)"/", 1, &o2));
        TRY(arena_put(s->g, str, n, &o2));
        n += prefix_len + 1;
    } else {
        TRY(arena_put(s->g, str, n, &o));
    }
    *off = (int64_t)o;
    *len = (uint32_t)n;
    return 0;
}

/* --- graph ------------------------------------------------------------------ */

/* A store path: as written, or (base names) the store dir + "/" + a base name. */
static int name_id(P *s, const unsigned char *str, size_t n, int base_names, int32_t *id)
{
    fg_graph *g = s->g;
    if (base_names && (n == 0 || str[0] != '/')) {
        size_t need = g->store_dir_len + 1 + n;
        if (need > g->tmp_cap) {
            char *t = realloc(g->tmp, need);
            if (!t) return FG_NOMEM;
            g->tmp = t;
            g->tmp_cap = need;
        }
        memcpy(g->tmp, g->store_dir, g->store_dir_len);
        g->tmp[g->store_dir_len] = '/';
        memcpy(g->tmp + g->store_dir_len + 1, str, n);
        return intern(g, &g->names, (const unsigned char *)g->tmp, need, id, NULL);
    }
    return intern(g, &g->names, str, n, id, NULL);
}

static int check_path(const fg_graph *g, int32_t id)
{
    const fg_intern *t = &g->names;
    const char *s = g->arena + t->off[id];
    size_t n = t->len[id], k = g->check_prefix_len;
    if (n <= k || memcmp(s, g->check_prefix, k) != 0) return FG_OTHER;
    if (memchr(s + k, '/', n - k)) return FG_OTHER;
    if (s[k] == '.' && (n == k + 1 || (n == k + 2 && s[k + 1] == '.'))) return FG_OTHER;
    return 0;
}

static void drop_behind(P *s)
{
    fg_graph *g = s->g;
    if (!g->base) return;
    size_t at = (size_t)(s->p - g->base);
    if (at < g->dropped + DROP_EVERY) return;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    /* base + dropped is page-aligned; drop whole pages up to the parser */
    size_t upto = g->dropped + (at - g->dropped) / page * page;
    madvise((void *)(g->base + g->dropped), upto - g->dropped, MADV_DONTNEED);
    g->dropped = upto;
}

/* A node's columns, appended (closure < 0: none, so not every node has one). */
static int push_node(fg_graph *g, int32_t path_id, int64_t nar_size, int64_t closure,
                     int64_t hash_off, uint32_t hash_len, int64_t drv_off, uint32_t drv_len,
                     int64_t nrefs)
{
    if (g->n == g->cap) {
        size_t c = g->cap ? g->cap * 2 : 4096;
#define RE(f)                                                   \
        do {                                                    \
            void *q_ = realloc(g->f, c * sizeof *g->f);         \
            if (!q_) return FG_NOMEM;                           \
            g->f = q_;                                          \
        } while (0)
        RE(path_id);
        RE(nar_size);
        RE(closure_size);
        RE(hash_off);
        RE(drv_off);
        RE(hash_len);
        RE(drv_len);
        RE(ref_count);
#undef RE
        g->cap = c;
    }
    size_t i = g->n++;
    g->path_id[i] = path_id;
    g->nar_size[i] = nar_size;
    g->closure_size[i] = closure;
    if (closure < 0) g->all_closure = 0;
    g->hash_off[i] = hash_off;
    g->hash_len[i] = hash_len;
    g->drv_off[i] = drv_off;
    g->drv_len[i] = drv_len;
    g->ref_count[i] = nrefs;
    return 0;
}

/* One node object. path_id >= 0: the path was its key (dict form, base names
 * allowed); else it comes from its "path" member. *had_info: it holds narHash
 * or references (what makes an object a path-info dict). */
static int node(P *s, int32_t path_id, int *had_info)
{
    fg_graph *g = s->g;
    int dict = path_id >= 0;
    int seen_path = 0, seen_refs = 0, seen_size = 0, seen_hash = 0, seen_closure = 0,
        seen_drv = 0, seen_valid = 0;
    int64_t nar_size = -1, closure = -1, hash_off = -1, drv_off = -1;
    uint32_t hash_len = 0, drv_len = 0;
    size_t first_ref = g->nrefs;
    TRY(expect(s, '{'));
    if (peek(s) != '}') {
        for (;;) {
            const unsigned char *k;
            size_t kn;
            if (peek(s) != '"') return FG_OTHER;
            /* a key with an escape or non-ASCII byte could still spell a known key */
            TRY(kept_string(s, &k, &kn));
            TRY(expect(s, ':'));
#define KEY(lit) (kn == sizeof(lit) - 1 && memcmp(k, lit, kn) == 0)
            if (KEY("references")) {
                if (seen_refs++) return FG_OTHER;
                TRY(expect(s, '['));
                if (peek(s) == ']') {
                    s->p++;
                } else {
                    pending batch[BATCH];
                    size_t k = 0;
                    for (;;) {
                        const unsigned char *r;
                        size_t rn;
                        TRY(kept_string(s, &r, &rn));
                        if (dict && (rn == 0 || r[0] != '/')) { /* a base name: joined */
                            int32_t id;
                            TRY(flush_refs(g, batch, k));
                            k = 0;
                            TRY(name_id(s, r, rn, 1, &id));
                            TRY(grow((void **)&g->refs, &g->refs_cap, g->nrefs + 1,
                                     sizeof *g->refs));
                            g->refs[g->nrefs++] = id;
                        } else {
                            batch[k].s = r;
                            batch[k].len = rn;
                            if (++k == BATCH) {
                                TRY(flush_refs(g, batch, k));
                                k = 0;
                            }
                        }
                        int c = peek(s);
                        s->p++;
                        if (c == ']') break;
                        if (c != ',') return FG_OTHER;
                    }
                    TRY(flush_refs(g, batch, k));
                }
            } else if (!dict && KEY("path")) {
                const unsigned char *str;
                size_t n;
                if (seen_path++) return FG_OTHER;
                TRY(kept_string(s, &str, &n));
                TRY(name_id(s, str, n, 0, &path_id));
            } else if (KEY("narSize")) {
                if (seen_size++) return FG_OTHER;
                TRY(size_value(s, &nar_size));
            } else if (KEY("closureSize")) {
                if (seen_closure++) return FG_OTHER;
                TRY(size_value(s, &closure));
            } else if (KEY("narHash")) {
                if (seen_hash++) return FG_OTHER;
                TRY(str_value(s, 0, NULL, 0, &hash_off, &hash_len));
            } else if (KEY("deriver")) {
                if (seen_drv++) return FG_OTHER;
                TRY(str_value(s, 1, dict ? g->store_dir : NULL, g->store_dir_len, &drv_off,
                              &drv_len));
            } else if (KEY("valid")) {
                if (seen_valid++) return FG_OTHER;
                if (peek(s) == 'f') return FG_OTHER; /* not valid: the general loader says so */
                TRY(skip_value(s, 2));
            } else {
                TRY(skip_value(s, 2));
            }
#undef KEY
            int c = peek(s);
            s->p++;
            if (c == '}') break;
            if (c != ',') return FG_OTHER;
        }
    } else {
        s->p++;
    }
    if (had_info) *had_info = seen_refs || seen_hash;
    if (path_id < 0) return FG_OTHER;
    TRY(push_node(g, path_id, nar_size < 0 ? 0 : nar_size, closure, hash_off, hash_len,
                  drv_off, drv_len, (int64_t)(g->nrefs - first_ref)));
    drop_behind(s);
    return 0;
}

/* The rest of a list whose '[' is consumed: node objects. */
static int node_list_rest(P *s)
{
    if (peek(s) == ']') {
        s->p++;
        return 0;
    }
    for (;;) {
        TRY(node(s, -1, NULL));
        int c = peek(s);
        s->p++;
        if (c == ']') return 0;
        if (c != ',') return FG_OTHER;
    }
}

/* The members of a path-info dict after its first one; '{' and the first done. */
static int path_info_rest(P *s)
{
    for (;;) {
        int c = peek(s);
        s->p++;
        if (c == '}') return 0;
        if (c != ',') return FG_OTHER;
        const unsigned char *k;
        size_t kn;
        int32_t id;
        TRY(kept_string(s, &k, &kn));
        TRY(expect(s, ':'));
        TRY(name_id(s, k, kn, 1, &id));
        TRY(node(s, id, NULL));
    }
}

/* The value under the caller's key: a node list or a path-info dict. */
static int keyed_value(P *s)
{
    int c = peek(s);
    s->p++;
    if (c == '[') return node_list_rest(s);
    if (c != '{') return FG_OTHER;
    if (peek(s) == '}') {
        s->p++;
        return 0;
    }
    const unsigned char *k;
    size_t kn;
    int32_t id;
    TRY(kept_string(s, &k, &kn));
    TRY(expect(s, ':'));
    TRY(name_id(s, k, kn, 1, &id));
    TRY(node(s, id, NULL));
    return path_info_rest(s);
}

/* Forget what a speculatively parsed first node added. */
static void unparse_nodes(fg_graph *g)
{
    g->n = 0;
    g->nrefs = 0;
    g->all_closure = 1;
}

static int top_object(P *s, const char *key, size_t key_len)
{
    fg_graph *g = s->g;
    int found = 0, lists = 0, first = 1;
    s->p++;
    if (peek(s) == '}') return FG_OTHER; /* no list of paths: the general loader says so */
    for (;;) {
        const unsigned char *k;
        size_t kn;
        int32_t kid;
        int fresh;
        TRY(kept_string(s, &k, &kn));
        TRY(expect(s, ':'));
        TRY(intern(g, &g->topkeys, k, kn, &kid, &fresh));
        if (!fresh) return FG_OTHER; /* a repeated key: Python keeps the last value */
        if (key) {
            if (kn == key_len && memcmp(k, key, kn) == 0) {
                TRY(keyed_value(s));
                found = 1;
            } else {
                TRY(skip_value(s, 1));
            }
        } else if (first && peek(s) == '{') {
            /* A path-info dict if this member looks like one; else an attrs file. */
            int32_t id;
            int had_info = 0, slash = kn && k[0] == '/'; /* k's page may go in node() */
            TRY(name_id(s, k, kn, 1, &id));
            TRY(node(s, id, &had_info));
            if (slash) had_info = 1;
            if (had_info) return path_info_rest(s);
            unparse_nodes(g);
        } else if (first && kn && k[0] == '/') {
            return FG_OTHER; /* a path-info dict whose first path is not an object */
        } else if (peek(s) == '[') {
            const unsigned char *open = s->p++;
            if (peek(s) == ']') {
                s->p++;
                lists++;
            } else if (peek(s) == '{') {
                /* a node list iff its first object has a "path" */
                int rc = node(s, -1, NULL);
                if (rc == FG_NOMEM) return rc;
                if (rc == 0) {
                    if (lists++) return FG_OTHER;
                    int c = peek(s);
                    s->p++;
                    if (c == ',') TRY(node_list_rest(s));
                    else if (c != ']') return FG_OTHER;
                } else {
                    return FG_OTHER; /* rare: not worth a second pass here */
                }
            } else {
                s->p = open;
                TRY(skip_value(s, 1));
            }
        } else {
            TRY(skip_value(s, 1));
        }
        first = 0;
        int c = peek(s);
        s->p++;
        if (c == '}') break;
        if (c != ',') return FG_OTHER;
    }
    if (key ? !found : lists != 1) return FG_OTHER;
    return 0;
}

/* Every path one name under the store dir; the sizes add up below 2^63. */
static int check_columns(const fg_graph *g)
{
    for (size_t i = 0; i < g->n; i++)
        if (check_path(g, g->path_id[i])) return FG_OTHER;
    int64_t total = 0;
    for (size_t i = 0; i < g->n; i++)
        if (__builtin_add_overflow(total, g->nar_size[i], &total)) return FG_OTHER;
    return 0;
}

int fg_parse(fg_graph *g, const unsigned char *buf, size_t len, const char *key, size_t key_len,
             int madv)
{
    P s = {buf, buf + len, g};
    g->all_closure = 1;
    g->base = madv ? buf : NULL;
    g->base_len = len;
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    g->dropped = (page - (uintptr_t)buf % page) % page; /* the first whole page */
    int c = peek(&s);
    int rc;
    if (c == '[') {
        if (key) return FG_OTHER; /* no key in a list: the general loader says so */
        s.p++;
        rc = node_list_rest(&s);
    } else if (c == '{') {
        rc = top_object(&s, key, key_len);
    } else {
        return FG_OTHER;
    }
    if (rc) return rc;
    if (peek(&s) != -1) return FG_OTHER;
    return check_columns(g);
}

/* --- a mapped file ----------------------------------------------------------- */

/* Reading the file into memory costs more than parsing it (fresh pages for a
 * copy of every byte); a mapping of the page cache costs almost nothing. The
 * price of a mapping is SIGBUS when the file shrinks under it: that fault, in
 * the mapped range and on the thread parsing, jumps back to fg_parse_fd, which
 * says FG_OTHER (the general loader then reads the file as it is now). Any
 * other SIGBUS goes to the handler that was there before.
 *
 * Why the jump leaves g consistent: the parser only faults on loads of the
 * input through unsigned char lvalues, which may alias anything, so every
 * earlier store into g has been made; malloc never touches the mapping. */
static __thread __attribute__((tls_model("initial-exec"))) sigjmp_buf *bus_jmp;
static __thread __attribute__((tls_model("initial-exec"))) const unsigned char *bus_lo, *bus_hi;
static pthread_mutex_t bus_mu = PTHREAD_MUTEX_INITIALIZER;
static int bus_users;
static struct sigaction bus_old;

static void on_bus(int sig, siginfo_t *si, void *ctx)
{
    /* si_code > 0: a fault the kernel raised; kill() and sigqueue() say <= 0 and
     * their si_addr is no address */
    int fault = si && si->si_code > 0;
    const unsigned char *at = fault ? (const unsigned char *)si->si_addr : NULL;
    if (bus_jmp && at >= bus_lo && at < bus_hi) siglongjmp(*bus_jmp, 1);
    if (bus_old.sa_flags & SA_SIGINFO) {
        if (bus_old.sa_sigaction) bus_old.sa_sigaction(sig, si, ctx);
        return;
    }
    if (bus_old.sa_handler != SIG_DFL && bus_old.sa_handler != SIG_IGN) {
        bus_old.sa_handler(sig);
        return;
    }
    if (!fault && bus_old.sa_handler == SIG_IGN) return; /* a sent one, ignored as before */
    /* default action: returning re-runs a faulting load, which now kills; a sent
     * signal would be lost by returning, so it is sent again (SA_NODEFER: at once) */
    signal(SIGBUS, SIG_DFL);
    if (!fault) raise(SIGBUS);
}

static int bus_enter(void)
{
    int rc = 0;
    pthread_mutex_lock(&bus_mu);
    if (bus_users == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_bus;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        rc = sigaction(SIGBUS, &sa, &bus_old);
    }
    if (rc == 0) bus_users++;
    pthread_mutex_unlock(&bus_mu);
    return rc;
}

static void bus_leave(void)
{
    pthread_mutex_lock(&bus_mu);
    if (--bus_users == 0) sigaction(SIGBUS, &bus_old, NULL);
    pthread_mutex_unlock(&bus_mu);
}

int fg_parse_fd(fg_graph *g, int fd, size_t len, const char *key, size_t key_len)
{
    if (len == 0) return FG_OTHER;
    unsigned char *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) return FG_OTHER;
    madvise(m, len, MADV_SEQUENTIAL);
    int rc = FG_OTHER;
    if (bus_enter() == 0) {
        sigjmp_buf jb;
        bus_lo = m;
        bus_hi = m + len;
        if (sigsetjmp(jb, 1) == 0) {
            bus_jmp = &jb;
            rc = fg_parse(g, m, len, key, key_len, 1);
        } else {
            rc = FG_OTHER; /* the file shrank while parsed */
        }
        bus_jmp = NULL;
        bus_leave();
    }
    munmap(m, len);
    return rc;
}

/* --- closureInfo ------------------------------------------------------------ */

typedef struct {
    const unsigned char *p, *end;
} lines;

/* The next '\n'-terminated line (the last may lack it); FG_OTHER past the end
 * or on a byte that is not printable ASCII. */
static int next_line(lines *L, const unsigned char **s, size_t *n)
{
    if (L->p >= L->end) return FG_OTHER;
    const unsigned char *q = L->p;
    while (q < L->end && *q != '\n') {
        if (*q < 0x20 || *q > 0x7e) return FG_OTHER;
        q++;
    }
    *s = L->p;
    *n = (size_t)(q - L->p);
    L->p = q < L->end ? q + 1 : q;
    return 0;
}

static int line_int(const unsigned char *s, size_t n, int64_t *out)
{
    uint64_t v = 0;
    if (n == 0 || n > 18) return FG_OTHER; /* below 2^63 without overflow checks */
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return FG_OTHER;
        v = v * 10 + (uint64_t)(s[i] - '0');
    }
    *out = (int64_t)v;
    return 0;
}

int fg_parse_closure_info(fg_graph *g, const unsigned char *reg, size_t reg_len,
                          const unsigned char *sp, size_t sp_len)
{
    lines L = {reg, reg + reg_len};
    const unsigned char *s;
    size_t n;
    g->all_closure = 0;
    /* As `text.split("\n")`: a text ending in '\n' has a last, empty line. */
    while (L.p < L.end) {
        if (*L.p == '\n') { /* empty lines between records */
            L.p++;
            continue;
        }
        int32_t path_id;
        int64_t nar_size = 0, hash_off = -1, drv_off = -1, count;
        uint32_t hash_len = 0, drv_len = 0;
        TRY(next_line(&L, &s, &n));
        TRY(intern(g, &g->names, s, n, &path_id, NULL));
        TRY(next_line(&L, &s, &n));
        /* With hashes, the line after the path is `algo:digest`; without, a deriver. */
        if (memchr(s, ':', n) && !(n && s[0] == '/')) {
            uint64_t o;
            TRY(arena_put(g, s, n, &o));
            hash_off = (int64_t)o;
            hash_len = (uint32_t)n;
            TRY(next_line(&L, &s, &n));
            TRY(line_int(s, n, &nar_size));
            TRY(next_line(&L, &s, &n));
        }
        if (n) {
            uint64_t o;
            TRY(arena_put(g, s, n, &o));
            drv_off = (int64_t)o;
            drv_len = (uint32_t)n;
        }
        TRY(next_line(&L, &s, &n));
        TRY(line_int(s, n, &count));
        for (int64_t k = 0; k < count; k++) {
            int32_t id;
            TRY(next_line(&L, &s, &n));
            TRY(intern(g, &g->names, s, n, &id, NULL));
            TRY(grow((void **)&g->refs, &g->refs_cap, g->nrefs + 1, sizeof *g->refs));
            g->refs[g->nrefs++] = id;
        }
        TRY(push_node(g, path_id, nar_size, -1, hash_off, hash_len, drv_off, drv_len, count));
    }
    /* store-paths, split on what str.split() calls whitespace in ASCII */
    const unsigned char *q = sp, *e = sp + sp_len;
    while (q < e) {
        unsigned char c = *q;
        if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f)) {
            q++;
            continue;
        }
        const unsigned char *a = q;
        while (q < e && *q > 0x20 && *q < 0x7f) q++;
        if (q < e && !(*q == ' ' || (*q >= 0x09 && *q <= 0x0d) || (*q >= 0x1c && *q <= 0x1f)))
            return FG_OTHER; /* control or non-ASCII byte */
        int32_t id;
        TRY(intern(g, &g->names, a, (size_t)(q - a), &id, NULL));
        TRY(grow((void **)&g->listed, &g->listed_cap, g->nlisted + 1, sizeof *g->listed));
        g->listed[g->nlisted++] = id;
    }
    return check_columns(g);
}
