/* Reference scanning the way Nix does it: find every 32-character window of
 * nix-base32 characters that equals the hash part of a candidate store path.
 *
 * Header-only (static inline) so both the NAR walker (nar.pyx, which scans
 * while it hashes) and the scan kernel (scan.pyx, which owns the table) use
 * the same code without an extra C source in setup.py.
 *
 * The table is built once per store and shared read-only by all threads;
 * each scan keeps its own `found` flags and its own carry (the last 31 bytes
 * of the previous chunk, so a hash split across two reads is still found).
 */
#ifndef FASTLAYER_SCAN_REFS_H
#define FASTLAYER_SCAN_REFS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REF_LEN 32

/* nix-base32 alphabet: 0-9 a-z without e, o, u, t. */
static const uint8_t ref_is_b32[256] = {
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1, ['6'] = 1,
    ['7'] = 1, ['8'] = 1, ['9'] = 1, ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1,
    ['f'] = 1, ['g'] = 1, ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1,
    ['m'] = 1, ['n'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1, ['s'] = 1, ['v'] = 1,
    ['w'] = 1, ['x'] = 1, ['y'] = 1, ['z'] = 1,
};

typedef struct {
    uint8_t *keys;    /* nslots * REF_LEN bytes */
    int32_t *index;   /* candidate number per slot, -1 when empty */
    uint64_t *filter; /* one bit per (top fbits of the mixed key): cheap rejection */
    uint64_t mask;    /* nslots - 1 (power of two) */
    int shift;        /* 64 - log2(nslots) */
    int fshift;       /* 64 - fbits */
    int32_t n;        /* number of candidates */
} reftab;

typedef struct {
    uint8_t tail[REF_LEN - 1];
    size_t tail_len;
} refcarry;

static inline uint64_t ref_mix(const uint8_t *s)
{
    /* The first 8 characters of a hash part are already well spread;
       a multiplicative mix is enough to spread them over the table. */
    uint64_t k;
    memcpy(&k, s, 8);
    return k * 0x9E3779B97F4A7C15ull;
}

static inline uint64_t ref_slot(const reftab *t, const uint8_t *s)
{
    return ref_mix(s) >> t->shift;
}

static inline void reftab_free(reftab *t)
{
    free(t->keys);
    free(t->index);
    free(t->filter);
    t->keys = NULL;
    t->index = NULL;
    t->filter = NULL;
}

/* Returns 0, or -1 when out of memory.  Hash parts must be REF_LEN bytes
   each, back to back, and distinct (the caller deduplicates). */
static inline int reftab_init(reftab *t, const uint8_t *hashes, int32_t n)
{
    uint64_t nslots = 16;
    int bits = 4;
    while (nslots < 2 * (uint64_t)n) {
        nslots <<= 1;
        bits++;
    }
    /* ~32 filter bits per candidate: a window of base32 text that is no
       candidate costs one probe of a small bitmap, not a table miss. */
    uint64_t fbitcount = 1 << 12;
    int fbits = 12;
    while (fbitcount < 32 * (uint64_t)n && fbits < 30) {
        fbitcount <<= 1;
        fbits++;
    }
    t->keys = (uint8_t *)calloc(nslots, REF_LEN);
    t->index = (int32_t *)malloc(nslots * sizeof(int32_t));
    t->filter = (uint64_t *)calloc(fbitcount / 64, sizeof(uint64_t));
    if (!t->keys || !t->index || !t->filter) {
        reftab_free(t);
        return -1;
    }
    t->fshift = 64 - fbits;
    memset(t->index, 0xff, nslots * sizeof(int32_t));
    t->mask = nslots - 1;
    t->shift = 64 - bits;
    t->n = n;
    for (int32_t i = 0; i < n; i++) {
        const uint8_t *h = hashes + (size_t)i * REF_LEN;
        uint64_t s = ref_slot(t, h);
        while (t->index[s] >= 0)
            s = (s + 1) & t->mask;
        memcpy(t->keys + s * REF_LEN, h, REF_LEN);
        t->index[s] = i;
        uint64_t f = ref_mix(h) >> t->fshift;
        t->filter[f >> 6] |= 1ull << (f & 63);
    }
    return 0;
}


static inline void ref_lookup(const reftab *t, uint8_t *found, const uint8_t *s)
{
    uint64_t mix = ref_mix(s);
    uint64_t f = mix >> t->fshift;
    if (!(t->filter[f >> 6] & (1ull << (f & 63))))
        return;
    uint64_t slot = mix >> t->shift;
    int32_t i;
    while ((i = t->index[slot]) >= 0) {
        if (memcmp(t->keys + slot * REF_LEN, s, REF_LEN) == 0) {
            found[i] = 1;
            return;
        }
        slot = (slot + 1) & t->mask;
    }
}

/* Every window of REF_LEN base32 characters in s[0:len] is looked up.
   Like Nix, check a window from its end so one non-base32 byte skips the
   whole window; once a window is valid, sliding by one needs one test. */
static inline void ref_search(const reftab *t, uint8_t *found, const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i + REF_LEN <= len) {
        int j;
        for (j = REF_LEN - 1; j >= 0; j--)
            if (!ref_is_b32[s[i + j]])
                break;
        if (j >= 0) {
            i += (size_t)j + 1;
            continue;
        }
        for (;;) {
            ref_lookup(t, found, s + i);
            if (i + REF_LEN >= len || !ref_is_b32[s[i + REF_LEN]])
                break;
            i++;
        }
        i += REF_LEN + 1;
    }
}

static inline void ref_carry_reset(refcarry *c)
{
    c->tail_len = 0;
}

/* Scan one more chunk of a byte stream whose earlier chunks went through
   the same carry; finds windows that straddle chunk boundaries. */
static inline void ref_feed(const reftab *t, uint8_t *found, refcarry *c, const uint8_t *s,
                            size_t len)
{
    if (len == 0)
        return;
    if (c->tail_len) {
        uint8_t tmp[2 * REF_LEN];
        size_t head = len < REF_LEN - 1 ? len : REF_LEN - 1;
        memcpy(tmp, c->tail, c->tail_len);
        memcpy(tmp + c->tail_len, s, head);
        ref_search(t, found, tmp, c->tail_len + head);
    }
    ref_search(t, found, s, len);
    /* Keep the last REF_LEN-1 bytes of (tail + s) for the next chunk. */
    if (len >= REF_LEN - 1) {
        memcpy(c->tail, s + len - (REF_LEN - 1), REF_LEN - 1);
        c->tail_len = REF_LEN - 1;
    } else {
        size_t keep = c->tail_len + len > REF_LEN - 1 ? REF_LEN - 1 - len : c->tail_len;
        memmove(c->tail, c->tail + c->tail_len - keep, keep);
        memcpy(c->tail + keep, s, len);
        c->tail_len = keep + len;
    }
}

#endif
