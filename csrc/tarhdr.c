#include "tarhdr.h"

#include <stdio.h>
#include <string.h>

/* Decode one code point at s[0..n) the way Python's strict UTF-8 decoder
 * does; an invalid byte decodes alone to U+DC00+byte (surrogateescape).
 * Returns the number of bytes consumed. */
static size_t u8_next(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    uint32_t v;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2; v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3; v = c & 0x0F;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F; /* no encoded surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4; v = c & 0x07;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        goto invalid;
    }
    if (n < len || s[1] < lo || s[1] > hi) goto invalid;
    for (size_t i = 1; i < len; i++) {
        if (i > 1 && (s[i] < 0x80 || s[i] > 0xBF)) goto invalid;
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
invalid:
    *cp = 0xDC00 + c;
    return 1;
}

int fl_utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint32_t cp;
        size_t k = u8_next(s + i, n - i, &cp);
        if (cp >= 0xDC80 && cp <= 0xDCFF && k == 1 && s[i] >= 0x80) return 0;
        i += k;
    }
    return 1;
}

int fl_pystr_cmp(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen)
{
    size_t i = 0, j = 0;
    /* Equal byte prefixes decode equally; skip them, then back up to the
     * start of the code point holding the first difference. */
    size_t m = alen < blen ? alen : blen, k = 0;
    while (k < m && a[k] == b[k]) k++;
    if (k == m) return alen < blen ? -1 : (alen > blen ? 1 : 0);
    /* A byte that is not a continuation byte always starts a decoding step,
     * so decoding from there agrees with decoding from the start. */
    while (k > 0 && ((a[k] & 0xC0) == 0x80 || (b[k] & 0xC0) == 0x80)) k--;
    i = j = k;
    while (i < alen && j < blen) {
        uint32_t ca, cb;
        i += u8_next(a + i, alen - i, &ca);
        j += u8_next(b + j, blen - j, &cb);
        if (ca != cb) return ca < cb ? -1 : 1;
    }
    if (i < alen) return 1;
    if (j < blen) return -1;
    return 0;
}

static int is_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80) return 0;
    return 1;
}

/* tarfile's stn(s, length, "ascii", "replace"): every non-ASCII code point
 * becomes one '?', then the bytes are cut at length and NUL padded. */
static void put_str(unsigned char *dst, size_t length, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, o = 0;
    while (i < n && o < length) {
        uint32_t cp;
        i += u8_next(u + i, n - i, &cp);
        dst[o++] = cp < 0x80 ? (unsigned char)cp : '?';
    }
    /* the caller zeroed dst, so the NUL padding is already there */
}

/* tarfile's itn for the POSIX formats: zero-padded octal plus NUL. */
static void put_oct(unsigned char *dst, int digits, uint64_t v)
{
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%0*llo", digits - 1, (unsigned long long)v);
    memcpy(dst, tmp, (size_t)digits - 1);
    dst[digits - 1] = 0;
}

static void ustar_block(unsigned char *b, const char *name, size_t name_len, uint32_t mode,
                        uint64_t uid, uint64_t gid, uint64_t size, uint64_t mtime, char type,
                        const char *link, size_t link_len, const char *uname, size_t uname_len,
                        const char *gname, size_t gname_len)
{
    memset(b, 0, FL_BLOCK);
    put_str(b, 100, name, name_len);
    put_oct(b + 100, 8, mode & 07777);
    put_oct(b + 108, 8, uid);
    put_oct(b + 116, 8, gid);
    put_oct(b + 124, 12, size);
    put_oct(b + 136, 12, mtime);
    memset(b + 148, ' ', 8);
    b[156] = (unsigned char)type;
    put_str(b + 157, 100, link, link_len);
    memcpy(b + 257, "ustar\0" "00", 8);
    put_str(b + 265, 32, uname, uname_len);
    put_str(b + 297, 32, gname, gname_len);
    /* devmajor/devminor and prefix stay NUL: tarfile writes empty device
     * fields for everything but character and block devices. */
    unsigned sum = 0;
    for (int i = 0; i < FL_BLOCK; i++) sum += b[i];
    char ck[8];
    snprintf(ck, sizeof ck, "%06o", sum);
    memcpy(b + 148, ck, 6);
    b[154] = 0; /* b[155] keeps its space, as tarfile leaves it */
}

/* One pax record "LEN key=value\n", where LEN counts itself. */
static size_t pax_record(unsigned char *out, const char *key, const char *val, size_t vlen)
{
    size_t klen = strlen(key);
    size_t l = klen + vlen + 3, p = 0, n;
    char digits[24];
    for (;;) {
        n = l + (size_t)snprintf(digits, sizeof digits, "%zu", p);
        if (n == p) break;
        p = n;
    }
    size_t d = (size_t)snprintf(digits, sizeof digits, "%zu", p);
    unsigned char *o = out;
    memcpy(o, digits, d); o += d;
    *o++ = ' ';
    memcpy(o, key, klen); o += klen;
    *o++ = '=';
    memcpy(o, val, vlen); o += vlen;
    *o++ = '\n';
    return (size_t)(o - out);
}

typedef struct {
    const char *key;
    const char *val;
    size_t len;
} pax_kv;

size_t fl_tar_header(unsigned char *out, const char *name, size_t name_len, const char *link,
                     size_t link_len, char type, uint32_t mode, uint64_t size,
                     const fl_owner *own)
{
    /* tarfile names directories with a trailing slash, before any check */
    char dirname[16400];
    if (type == '5' && (name_len == 0 || name[name_len - 1] != '/')) {
        if (name_len + 2 > sizeof dirname) return 0;
        memcpy(dirname, name, name_len);
        dirname[name_len++] = '/';
        name = dirname;
    }
    pax_kv kv[8];
    int nkv = 0;
    char numbuf[4][24];
    /* String fields: a pax record when not ASCII or longer than the field. */
    struct { const char *key; const char *s; size_t n, limit; } strs[4] = {
        {"path", name, name_len, 100},
        {"linkpath", link, link_len, 100},
        {"uname", own->uname, own->uname_len, 32},
        {"gname", own->gname, own->gname_len, 32},
    };
    for (int i = 0; i < 4; i++) {
        if (!is_ascii(strs[i].s, strs[i].n) || strs[i].n > strs[i].limit)
            kv[nkv++] = (pax_kv){strs[i].key, strs[i].s, strs[i].n};
    }
    /* Number fields: out of the octal range -> 0 in ustar, exact in pax. */
    int64_t nums[4] = {own->uid, own->gid, (int64_t)size, own->mtime};
    const char *nkeys[4] = {"uid", "gid", "size", "mtime"};
    const int ndig[4] = {8, 8, 12, 12};
    uint64_t put[4];
    for (int i = 0; i < 4; i++) {
        int64_t v = nums[i];
        uint64_t limit = (uint64_t)1 << (3 * (ndig[i] - 1));
        int fits = i == 2 ? size < limit : (v >= 0 && (uint64_t)v < limit);
        if (fits) {
            put[i] = i == 2 ? size : (uint64_t)v;
        } else {
            put[i] = 0;
            int len = i == 2 ? snprintf(numbuf[i], 24, "%llu", (unsigned long long)size)
                             : snprintf(numbuf[i], 24, "%lld", (long long)v);
            kv[nkv++] = (pax_kv){nkeys[i], numbuf[i], (size_t)len};
        }
    }
    size_t off = 0;
    if (nkv) {
        /* Values that are not valid UTF-8 force hdrcharset=BINARY, raw bytes. */
        int binary = 0;
        for (int i = 0; i < nkv; i++)
            if (!fl_utf8_valid((const unsigned char *)kv[i].val, kv[i].len)) binary = 1;
        unsigned char *rec = out + FL_BLOCK;
        size_t rlen = 0;
        size_t need = 32;
        for (int i = 0; i < nkv; i++) need += kv[i].len + 64;
        if (need + 2 * FL_BLOCK > FL_HDR_MAX) return 0;
        if (binary) {
            memcpy(rec, "21 hdrcharset=BINARY\n", 21);
            rlen = 21;
        }
        for (int i = 0; i < nkv; i++) rlen += pax_record(rec + rlen, kv[i].key, kv[i].val, kv[i].len);
        size_t padded = (rlen + FL_BLOCK - 1) / FL_BLOCK * FL_BLOCK;
        memset(rec + rlen, 0, padded - rlen);
        ustar_block(out, "././@PaxHeader", 14, 0, 0, 0, rlen, 0, 'x', "", 0, "", 0, "", 0);
        off = FL_BLOCK + padded;
    }
    ustar_block(out + off, name, name_len, mode, put[0], put[1], put[2], put[3], type, link,
                link_len, own->uname, own->uname_len, own->gname, own->gname_len);
    return off + FL_BLOCK;
}
