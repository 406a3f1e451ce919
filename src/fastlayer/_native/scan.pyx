# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Store-path hash-part lookup table for reference scanning.

A RefTable holds the 32-character hash parts of every candidate store path
in an open-addressing table (csrc/scan_refs.h). It is built once per store
and shared read-only by all scanning threads; nar.nar_walk takes its
`address` and scans while it hashes. `scan_chunks` scans plain byte chunks
(for tests of the chunk-boundary carry, and for callers with buffers).
"""

from libc.stdint cimport int32_t, uint8_t


cdef extern from "scan_refs.h" nogil:
    ctypedef struct reftab:
        int32_t n
    ctypedef struct refcarry:
        size_t tail_len
    int reftab_init(reftab *t, const uint8_t *hashes, int32_t n)
    void reftab_free(reftab *t)
    void ref_carry_reset(refcarry *c)
    void ref_feed(const reftab *t, uint8_t *found, refcarry *c, const uint8_t *s, size_t n)


cdef class RefTable:
    """Lookup table over hash parts; candidate i is hashes[32*i:32*i+32]."""

    cdef reftab tab
    cdef bint ready

    def __cinit__(self, const uint8_t[::1] hashes not None):
        cdef size_t total = hashes.shape[0]
        if total % 32 or total // 32 >= 2**31:
            raise ValueError("hash parts must be 32 bytes each")
        if reftab_init(&self.tab, &hashes[0] if total else NULL, <int32_t>(total // 32)) != 0:
            raise MemoryError()
        self.ready = True

    def __dealloc__(self):
        if self.ready:
            reftab_free(&self.tab)

    def __len__(self):
        return self.tab.n

    @property
    def address(self):
        """The C table's address, for nar.nar_walk(table=...); keep self alive."""
        return <size_t>&self.tab

    def scan_chunks(self, chunks, uint8_t[::1] found not None):
        """Scan an iterable of bytes-like chunks as one stream; set found[i] = 1."""
        cdef refcarry carry
        cdef const uint8_t[::1] view
        if <size_t>found.shape[0] < <size_t>self.tab.n:
            raise ValueError("found must have one byte per candidate")
        if self.tab.n == 0:
            return
        ref_carry_reset(&carry)
        for chunk in chunks:
            view = chunk
            if view.shape[0]:
                with nogil:
                    ref_feed(&self.tab, &found[0], &carry, &view[0], view.shape[0])
