/* Tar header packing, byte-compatible with Python's tarfile in PAX mode.
 *
 * nixpkgs streams layers with `tarfile` (format PAX, encoding utf-8 with
 * surrogateescape); equal bytes mean equal diff_ids, so registries share
 * layers built by either tool. Every rule here mirrors one of tarfile's:
 * see DESIGN.md section 2.
 */
#ifndef FASTLAYER_TARHDR_H
#define FASTLAYER_TARHDR_H

#include <stddef.h>
#include <stdint.h>

#define FL_BLOCK 512
#define FL_RECORD 10240
/* Largest header we ever emit: pax block + records for path, linkpath,
 * uname, gname and numbers (each at most a few KiB) + the ustar block. */
#define FL_HDR_MAX (64 * 1024)

typedef struct {
    int64_t mtime;
    int64_t uid, gid;
    const char *uname;
    size_t uname_len;
    const char *gname;
    size_t gname_len;
} fl_owner;

/* Pack the header(s) of one entry into out (capacity >= FL_HDR_MAX).
 * type is the tar type flag ('0', '2', '5', ...). Returns the byte count,
 * a multiple of 512, or 0 when a field cannot fit even in a pax header. */
size_t fl_tar_header(unsigned char *out, const char *name, size_t name_len,
                     const char *link, size_t link_len, char type, uint32_t mode,
                     uint64_t size, const fl_owner *own);

/* Compare two file names as Python compares their str forms (decoded as
 * UTF-8 with surrogateescape): by code point. This is the order sorted()
 * gives pathlib components, which nixpkgs uses for entries. */
int fl_pystr_cmp(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen);

/* Strict UTF-8 (as Python decodes it): 1 if all of s is valid. */
int fl_utf8_valid(const unsigned char *s, size_t n);

#endif
