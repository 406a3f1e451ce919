# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Closure graph JSON straight into CSR arrays (csrc/graphjson.c).

`parse` returns the columns of a graph, or None when the input is anything but
the well-formed common case (escapes, non-ASCII paths, duplicate or dangling
paths, bad sizes, ...): the caller then runs the general loader, which names
the culprit. One Python str per path (and per hash or deriver); references
never become Python objects.
"""

import numpy as np

cimport numpy as cnp
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

cnp.import_array()


cdef extern from "graphjson.h":
    ctypedef struct fg_intern:
        uint64_t *off
        uint32_t *len
        size_t n

    ctypedef struct fg_graph:
        char *arena
        fg_intern names
        size_t n
        int32_t *path_id
        int64_t *nar_size
        int64_t *closure_size
        int64_t *hash_off
        int64_t *drv_off
        uint32_t *hash_len
        uint32_t *drv_len
        int64_t *ref_count
        int32_t *refs
        size_t nrefs
        int32_t *listed
        size_t nlisted
        int all_closure
        const char *store_dir
        size_t store_dir_len
        const char *check_prefix
        size_t check_prefix_len

    int FG_OK, FG_OTHER, FG_NOMEM
    void fg_init(fg_graph *g) nogil
    void fg_free(fg_graph *g) nogil
    int fg_parse(fg_graph *g, const unsigned char *buf, size_t len, const char *key,
                 size_t key_len, int madv) nogil
    int fg_parse_fd(fg_graph *g, int fd, size_t len, const char *key, size_t key_len) nogil
    int fg_parse_closure_info(fg_graph *g, const unsigned char *reg, size_t reg_len,
                              const unsigned char *sp, size_t sp_len) nogil


cdef list _strings(const char *arena, const int64_t *off, const uint32_t *length, size_t n):
    cdef list out = [None] * n
    cdef size_t i
    for i in range(n):
        if off[i] >= 0:
            out[i] = PyUnicode_DecodeLatin1(arena + off[i], length[i], NULL)
    return out


cdef void _inputs(fg_graph *g, bytes store_dir, bytes check_prefix, object key,
                  const char **key_p, size_t *key_n):
    """g ready for a parse; key (bytes or None) as the C pointer and length."""
    if key is not None:
        key_p[0] = <bytes>key
        key_n[0] = len(<bytes>key)
    fg_init(g)
    g.store_dir = store_dir
    g.store_dir_len = len(store_dir)
    g.check_prefix = check_prefix
    g.check_prefix_len = len(check_prefix)


def parse(const unsigned char[::1] buf, key, bytes store_dir, bytes check_prefix,
          bint drop_pages=False):
    """(names, counts, cols, nar_size, nar_hash, closure_size, deriver) or None.

    key: bytes or None. Rows are paths in file order; `cols` holds each row's
    references as row ids, `counts` how many per row (not yet deduplicated).
    drop_pages: buf is private memory the caller discards afterwards; its
    pages are dropped (zeroed) once parsed, so a large file is in memory about
    once, not once plus its parse."""
    cdef fg_graph g
    cdef const char *key_p = NULL
    cdef size_t key_n = 0
    cdef int rc
    cdef size_t m = buf.shape[0]
    if m == 0:
        return None
    _inputs(&g, store_dir, check_prefix, key, &key_p, &key_n)
    try:
        with nogil:
            rc = fg_parse(&g, &buf[0], m, key_p, key_n, drop_pages)
        return _result(&g, rc)
    finally:
        fg_free(&g)


def parse_fd(int fd, size_t size, key, bytes store_dir, bytes check_prefix):
    """`parse` of the first `size` bytes of the regular file `fd`, mapped rather
    than read (no copy of the file in memory). None also when the file shrinks
    while it is parsed."""
    cdef fg_graph g
    cdef const char *key_p = NULL
    cdef size_t key_n = 0
    cdef int rc
    if size == 0:
        return None
    _inputs(&g, store_dir, check_prefix, key, &key_p, &key_n)
    try:
        with nogil:
            rc = fg_parse_fd(&g, fd, size, key_p, key_n)
        return _result(&g, rc)
    finally:
        fg_free(&g)


def parse_closure_info(const unsigned char[::1] registration,
                       const unsigned char[::1] store_paths, bytes check_prefix):
    """A closureInfo's two files, as `parse` returns them, or None (anything
    else, including every error: store-paths and registration disagreeing)."""
    cdef fg_graph g
    cdef int rc
    cdef size_t rn = registration.shape[0], sn = store_paths.shape[0]
    cdef const unsigned char *rp = &registration[0] if rn else <const unsigned char *>b""
    cdef const unsigned char *sp = &store_paths[0] if sn else <const unsigned char *>b""
    fg_init(&g)
    g.check_prefix = check_prefix
    g.check_prefix_len = len(check_prefix)
    try:
        with nogil:
            rc = fg_parse_closure_info(&g, rp, rn, sp, sn)
        return _result(&g, rc, True)
    finally:
        fg_free(&g)


cdef _result(fg_graph *g, int rc, bint closure_info=False):
    cdef size_t i, n = g.n
    cdef int32_t *row_of = NULL
    if rc == FG_NOMEM:
        raise MemoryError()
    if rc != FG_OK:
        return None
    try:
        row_of = <int32_t *>malloc((g.names.n + 1) * sizeof(int32_t))
        if row_of == NULL:
            raise MemoryError()
        counts_arr = np.empty(n, dtype=np.int64)
        cols_arr = np.empty(g.nrefs, dtype=np.int32)
        sizes_arr = np.empty(n, dtype=np.int64)
        closure_arr = np.empty(n, dtype=np.int64) if g.all_closure and n else None
        if not _columns(g, row_of, counts_arr, cols_arr, sizes_arr, closure_arr):
            return None  # a duplicate or dangling path
        if closure_info and not _listed_match(g, row_of):
            return None
        names = [None] * n
        for i in range(n):
            k = g.path_id[i]
            names[i] = PyUnicode_DecodeLatin1(g.arena + g.names.off[k], g.names.len[k], NULL)
        hashes = _strings(g.arena, g.hash_off, g.hash_len, n)
        derivers = _strings(g.arena, g.drv_off, g.drv_len, n)
        return names, counts_arr, cols_arr, sizes_arr, hashes, closure_arr, derivers
    finally:
        free(row_of)


cdef bint _listed_match(fg_graph *g, int32_t *row_of):
    """What the general loader accepts: every store-paths entry registered, and
    (when the counts differ) every registered path listed."""
    cdef size_t i, covered = 0
    cdef int32_t r
    cdef char *seen = <char *>calloc(g.n + 1, 1)
    if seen == NULL:
        raise MemoryError()
    try:
        for i in range(g.nlisted):
            r = row_of[g.listed[i]]
            if r < 0:
                return False
            if not seen[r]:
                seen[r] = 1
                covered += 1
        return g.nlisted == g.n or covered == g.n
    finally:
        free(seen)


cdef bint _columns(fg_graph *g, int32_t *row_of, int64_t[::1] counts, int32_t[::1] cols,
                   int64_t[::1] sizes, closure_arr):
    cdef size_t i, e, n = g.n
    cdef int32_t r
    cdef int64_t[::1] closure
    with nogil:
        for i in range(g.names.n):
            row_of[i] = -1
        for i in range(n):
            if row_of[g.path_id[i]] >= 0:
                return False
            row_of[g.path_id[i]] = <int32_t>i
            counts[i] = g.ref_count[i]
            sizes[i] = g.nar_size[i]
        for e in range(g.nrefs):
            r = row_of[g.refs[e]]
            if r < 0:
                return False
            cols[e] = r
    if closure_arr is not None:
        closure = closure_arr
        for i in range(n):
            closure[i] = g.closure_size[i]
    return True
