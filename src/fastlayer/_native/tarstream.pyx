# cython: language_level=3
"""Single-pass layer tar streaming.

A LayerStream is built from an lstat walk (csrc/walk.c) that fixes every
entry, its order and the exact tar size before any content is read. fill()
then writes headers, file contents and padding into caller buffers with the
GIL released, opening each file once; the caller hashes and ships buffers
on another thread, so reading and hashing overlap on two cores.
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset, strerror

cdef extern from "<string.h>" nogil:
    void *memrchr(const void *s, int c, size_t n)
from libc.errno cimport errno
from posix.unistd cimport close, read
from posix.fcntl cimport O_RDONLY, O_NONBLOCK, open as c_open
from posix.stat cimport S_ISREG, fstat, struct_stat

cdef extern from "<fcntl.h>":
    int O_NOFOLLOW
    int O_CLOEXEC
    int O_DIRECTORY
    int O_PATH
    int openat(int dirfd, const char *path, int flags, ...) nogil

cdef extern from "<fnmatch.h>" nogil:
    int fnmatch(const char *pattern, const char *string, int flags)

cdef extern from "<stdio.h>":
    int snprintf(char *s, size_t n, const char *fmt, ...) nogil

cdef extern from "tarhdr.h" nogil:
    enum: FL_HDR_MAX
    ctypedef struct fl_owner:
        int64_t mtime
        int64_t uid
        int64_t gid
        const char *uname
        size_t uname_len
        const char *gname
        size_t gname_len
    size_t fl_tar_header(unsigned char *out, const char *name, size_t name_len,
                         const char *link, size_t link_len, char type, uint32_t mode,
                         uint64_t size, const fl_owner *own)
    int fl_pystr_cmp(const unsigned char *a, size_t alen, const unsigned char *b, size_t blen)

cdef extern from "walk.h" nogil:
    enum: FL_PATH_MAX
    ctypedef struct fl_entry:
        uint64_t rel_off, link_off
        uint32_t root, rel_len, link_len
        uint32_t mode
        uint64_t size
        uint64_t dev, ino
        int64_t mtime_ns
        char type
    ctypedef struct fl_walk:
        char *blob
        fl_entry *ents
        size_t n
        char err[8192]
    void fl_walk_init(fl_walk *w)
    void fl_walk_free(fl_walk *w)
    int fl_walk_add_dir(fl_walk *w, const char *arc, size_t arc_len, uint32_t mode)
    int fl_walk_root(fl_walk *w, const char *fs, size_t fs_len, const char *arc, size_t arc_len)
    size_t fl_entry_fs(const fl_walk *w, const fl_entry *e, char *buf)
    size_t fl_entry_arc(const fl_walk *w, const fl_entry *e, char *buf)


class LayerSourceError(OSError):
    """A source file is missing, unreadable, of an unsupported type, or changed."""


DEF BLOCK = 512

DEF RECORD = 10240

# fill() stages
DEF ST_HEADER = 0
DEF ST_DATA = 1
DEF ST_PAD = 2
DEF ST_TRAILER = 3
DEF ST_DONE = 4


cdef inline uint64_t pad512(uint64_t n) nogil:
    return (BLOCK - n % BLOCK) % BLOCK


cdef inline int64_t mtime_ns(struct_stat *st) nogil:
    return <int64_t>st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec


def pack_header(bytes name, bytes type, uint32_t mode, uint64_t size, int64_t mtime,
                int64_t uid, int64_t gid, bytes uname, bytes gname, bytes link=b""):
    """One entry's header bytes (pax + ustar when needed), as tarfile writes them."""
    cdef fl_owner own
    own.mtime = mtime
    own.uid = uid
    own.gid = gid
    own.uname = uname
    own.uname_len = len(uname)
    own.gname = gname
    own.gname_len = len(gname)
    cdef unsigned char *out = <unsigned char *>malloc(FL_HDR_MAX)
    if out == NULL:
        raise MemoryError()
    cdef size_t n
    try:
        n = fl_tar_header(out, name, len(name), link, len(link), (<char *>type)[0], mode,
                          size, &own)
        if n == 0:
            raise ValueError(f"tar header fields too long for {name!r}")
        return out[:n]
    finally:
        free(out)


def pystr_cmp(bytes a, bytes b):
    """Order of two file names as Python orders their str forms (for tests)."""
    return fl_pystr_cmp(a, len(a), b, len(b))


cdef class LayerStream:
    """The bytes of one layer tar, produced once, in order, by fill()."""

    cdef fl_walk w
    cdef fl_owner own
    cdef bytes _uname, _gname
    cdef readonly uint64_t size
    cdef readonly uint64_t produced
    cdef size_t i
    cdef int stage
    cdef int fd
    cdef int dfd                    # the directory of the last file opened (O_PATH)
    cdef size_t dir_len             # its path: dirbuf[:dir_len]
    cdef char dirbuf[FL_PATH_MAX]
    cdef uint64_t left
    cdef unsigned char *hdr
    cdef size_t hdr_len, hdr_pos
    cdef char msg[FL_PATH_MAX + 512]
    cdef char fsbuf[FL_PATH_MAX]    # an entry's path on disk, assembled when needed
    cdef char arcbuf[FL_PATH_MAX]   # an entry's archive name, likewise
    cdef int *rule_of          # per entry: index of the permission rule, or -1
    cdef int64_t *rules_c      # per rule: uid, gid, mode (-1 = keep)
    cdef list _rules

    def __cinit__(self):
        fl_walk_init(&self.w)
        self.fd = -1
        self.dfd = -1

        self.hdr = <unsigned char *>malloc(FL_HDR_MAX)
        if self.hdr == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.rule_of)
        free(self.rules_c)
        if self.fd >= 0:
            close(self.fd)
        if self.dfd >= 0:
            close(self.dfd)
        fl_walk_free(&self.w)
        free(self.hdr)

    def __init__(self, list lead_dirs, list roots, int64_t mtime, int64_t uid, int64_t gid,
                 bytes uname, bytes gname):
        """lead_dirs: [(archive name, mode)] written first (e.g. /nix, /nix/store);
        roots: [(path on disk, archive name)], each walked in full."""
        cdef bytes arc, fs
        cdef uint32_t mode
        cdef int rc
        for arc, mode in lead_dirs:
            if fl_walk_add_dir(&self.w, arc, len(arc), mode) != 0:
                raise MemoryError()
        cdef const char *fs_p
        cdef const char *arc_p
        cdef size_t fs_n, arc_n
        for fs, arc in roots:
            fs_p, fs_n, arc_p, arc_n = fs, len(fs), arc, len(arc)
            with nogil:
                rc = fl_walk_root(&self.w, fs_p, fs_n, arc_p, arc_n)
            if rc != 0:
                raise LayerSourceError(self.w.err.decode("utf-8", "surrogateescape"))
        self._uname = uname
        self._gname = gname
        self.own.mtime = mtime
        self.own.uid = uid
        self.own.gid = gid
        self.own.uname = self._uname
        self.own.uname_len = len(self._uname)
        self.own.gname = self._gname
        self.own.gname_len = len(self._gname)
        self._measure()
        self.left = 0
        self.stage = ST_HEADER

    cdef _measure(self):
        """The exact tar size: headers, data, padding, end blocks, record padding."""
        cdef uint64_t total = 0
        cdef size_t k, h = 1
        cdef fl_entry *e = NULL
        with nogil:
            for k in range(self.w.n):
                e = &self.w.ents[k]
                h = self._header(e, k)
                if h == 0:
                    break
                total += h + e.size + pad512(e.size)
        if h == 0 and self.w.n:
            raise LayerSourceError(f"tar header fields too long for {self._arc(e)!r}")
        total += 2 * BLOCK
        total += (RECORD - total % RECORD) % RECORD
        self.size = total

    def set_rules(self, list rules):
        """Owner and mode overrides: [(glob bytes, uid, gid, mode)], -1 = keep.

        The last rule whose glob matches an entry's archive name (fnmatch
        without FNM_PATHNAME: `*` matches `/` too) applies; the tar size is
        measured again. Call before the first fill()."""
        if self.produced:
            raise ValueError("rules must be set before streaming")
        cdef size_t k
        cdef Py_ssize_t r
        cdef bytes pat
        cdef const char *name
        self._rules = [(bytes(p), int(u), int(g), int(m)) for p, u, g, m in rules]
        free(self.rule_of)
        self.rule_of = <int *>malloc(max(self.w.n, 1) * sizeof(int))
        if self.rule_of == NULL:
            raise MemoryError()
        for k in range(self.w.n):
            self.rule_of[k] = -1
        for r, (pat, _, _, _) in enumerate(self._rules):
            for k in range(self.w.n):
                fl_entry_arc(&self.w, &self.w.ents[k], self.arcbuf)
                if fnmatch(pat, self.arcbuf, 0) == 0:
                    self.rule_of[k] = <int>r
        free(self.rules_c)
        self.rules_c = <int64_t *>malloc(max(len(self._rules), 1) * 3 * sizeof(int64_t))
        if self.rules_c == NULL:
            raise MemoryError()
        for r, (_, uid, gid, mode) in enumerate(self._rules):
            self.rules_c[3 * r] = uid
            self.rules_c[3 * r + 1] = gid
            self.rules_c[3 * r + 2] = mode
        self._measure()

    def __len__(self):
        return self.w.n

    def names(self):
        """Archive names of the entries, in order (bytes)."""
        return [self._arc(&self.w.ents[k]) for k in range(self.w.n)]

    cdef bytes _arc(self, fl_entry *e):
        cdef size_t n = fl_entry_arc(&self.w, e, self.arcbuf)
        return self.arcbuf[:n]

    cdef size_t _header(self, fl_entry *e, size_t k) noexcept nogil:
        # link_off is 0 for non-symlinks; link_len 0 makes the link name empty
        cdef const char *link = self.w.blob + e.link_off
        cdef uint32_t link_len = e.link_len if e.type == b'2' else 0
        cdef fl_owner own = self.own
        cdef uint32_t mode = e.mode
        cdef int r = self.rule_of[k] if self.rule_of != NULL else -1
        if r >= 0:
            if self.rules_c[3 * r] >= 0:
                own.uid = self.rules_c[3 * r]
            if self.rules_c[3 * r + 1] >= 0:
                own.gid = self.rules_c[3 * r + 1]
            if self.rules_c[3 * r + 2] >= 0:
                mode = (mode & ~0o7777) | (self.rules_c[3 * r + 2] & 0o7777)
        cdef size_t arc_len = fl_entry_arc(&self.w, e, self.arcbuf)
        return fl_tar_header(self.hdr, self.arcbuf, arc_len, link, link_len,
                             e.type, mode, e.size, &own)

    cdef int _fail(self, const char *what, fl_entry *e, int err) noexcept nogil:
        if err:
            fl_entry_fs(&self.w, e, self.fsbuf)
            snprintf(self.msg, sizeof(self.msg), "%s %s: %s", what, self.fsbuf,
                     strerror(err))
        else:
            fl_entry_fs(&self.w, e, self.fsbuf)
            snprintf(self.msg, sizeof(self.msg), "%s %s", what, self.fsbuf)
        return -1

    cdef int _open(self, fl_entry *e) noexcept nogil:
        # Relative to its directory's fd, kept while files of one directory
        # follow each other: no path walk and no stat per file. The walk's
        # lstat is the identity the file must still have; _close checks it
        # once, after the read.
        cdef size_t n = fl_entry_fs(&self.w, e, self.fsbuf)
        cdef const char *slash = <const char *>memrchr(self.fsbuf, 47, n)  # '/'
        cdef size_t d = slash - self.fsbuf if slash != NULL else 0
        if slash == NULL or d == 0:  # a relative or top-level name: open it as is
            self.fd = c_open(self.fsbuf, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        else:
            if self.dfd < 0 or d != self.dir_len or memcmp(self.dirbuf, self.fsbuf, d) != 0:
                if self.dfd >= 0:
                    close(self.dfd)
                self.fsbuf[d] = 0
                self.dfd = c_open(self.fsbuf, O_PATH | O_DIRECTORY | O_CLOEXEC)
                self.fsbuf[d] = 47
                if self.dfd < 0:
                    return self._fail("cannot open", e, errno)
                memcpy(self.dirbuf, self.fsbuf, d)
                self.dir_len = d
            self.fd = openat(self.dfd, self.fsbuf + d + 1,
                             O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        if self.fd < 0:
            return self._fail("cannot open", e, errno)
        return 0

    cdef int _close(self, fl_entry *e) noexcept nogil:
        cdef struct_stat st
        cdef int rc = fstat(self.fd, &st)
        close(self.fd)
        self.fd = -1
        if rc != 0:
            return self._fail("cannot stat", e, errno)
        if not S_ISREG(st.st_mode) or st.st_ino != e.ino or st.st_dev != e.dev:
            return self._fail("file changed since it was listed (size, type or mtime):",
                              e, 0)
        if <uint64_t>st.st_size != e.size or mtime_ns(&st) != e.mtime_ns:
            return self._fail("file changed while it was read:", e, 0)
        return 0

    cdef int _read_failed(self, fl_entry *e, ssize_t got) noexcept nogil:
        # A read error or early end: say "changed since listed" if the file
        # open is no longer the one the walk saw (a fifo, a device, another file).
        cdef struct_stat st
        cdef int err = errno
        if (fstat(self.fd, &st) == 0 and (not S_ISREG(st.st_mode) or st.st_ino != e.ino
                                            or st.st_dev != e.dev)):
            return self._fail("file changed since it was listed (size, type or mtime):",
                              e, 0)
        if got < 0:
            return self._fail("cannot read", e, err)
        return self._fail("file shrank while it was read:", e, 0)

    cdef Py_ssize_t _fill(self, unsigned char *buf, size_t cap) noexcept nogil:
        cdef size_t pos = 0, n
        cdef ssize_t got
        cdef fl_entry *e
        while pos < cap and self.stage != ST_DONE:
            if self.stage == ST_HEADER:
                if self.i == self.w.n:
                    if self.dfd >= 0:
                        close(self.dfd)
                        self.dfd = -1
                    self.stage = ST_TRAILER
                    self.left = self.size - self.produced - pos
                    continue
                e = &self.w.ents[self.i]
                if self.hdr_pos == 0:
                    self.hdr_len = self._header(e, self.i)
                n = min(self.hdr_len - self.hdr_pos, cap - pos)
                memcpy(buf + pos, self.hdr + self.hdr_pos, n)
                pos += n
                self.hdr_pos += n
                if self.hdr_pos < self.hdr_len:
                    continue
                self.hdr_pos = 0
                if e.type == b'0':
                    if self._open(e) != 0:
                        return -1
                    self.left = e.size
                    self.stage = ST_DATA
                    if e.size == 0 and self._finish_file(e) != 0:
                        return -1
                else:
                    self.i += 1
            elif self.stage == ST_DATA:
                e = &self.w.ents[self.i]
                got = read(self.fd, buf + pos, min(self.left, cap - pos))
                if got <= 0:
                    return self._read_failed(e, got)
                pos += got
                self.left -= got
                if self.left == 0 and self._finish_file(e) != 0:
                    return -1
            elif self.stage == ST_PAD or self.stage == ST_TRAILER:
                n = min(self.left, cap - pos)
                memset(buf + pos, 0, n)
                pos += n
                self.left -= n
                if self.left == 0:
                    if self.stage == ST_PAD:
                        self.i += 1
                        self.stage = ST_HEADER
                    else:
                        self.stage = ST_DONE
        self.produced += pos
        return pos

    cdef int _finish_file(self, fl_entry *e) noexcept nogil:
        if self._close(e) != 0:
            return -1
        self.left = pad512(e.size)
        if self.left:
            self.stage = ST_PAD
        else:
            self.i += 1
            self.stage = ST_HEADER
        return 0

    def fill(self, unsigned char[::1] buf not None):
        """Write the next bytes into buf; returns how many (0 at the end)."""
        cdef Py_ssize_t n
        with nogil:
            n = self._fill(&buf[0], buf.shape[0])
        if n < 0:
            if self.fd >= 0:
                close(self.fd)
                self.fd = -1
            raise LayerSourceError(self.msg.decode("utf-8", "surrogateescape"))
        return n
