# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""NAR serialisation of a filesystem path, streamed into a sink in one pass.

`nar_walk(path, sink)` writes the NAR (Nix's archive format) of `path` into
a reusable buffer and hands the buffer to `sink(memoryview)` whenever it
fills (and once at the end). The NAR is never materialised: with
`sink=hashlib.sha256().update` this is a single-pass narHash. File contents
are read straight into that buffer, so each byte is read once and copied
never. The walk itself (openat/readdir/read) runs without the GIL; only the
sink call takes it (and OpenSSL releases it again for large updates), so
several paths hash in parallel threads.

Optionally, the same pass scans names, symlink targets and contents for
store-path hash parts (see csrc/scan_refs.h and scan.pyx), which is exactly
what Nix scans, since Nix scans the NAR dump itself.

Format facts (Nix src/libutil/archive.cc): every token is a string, written
as a little-endian u64 length, the bytes, and zero padding to 8 bytes;
directory entries come sorted by raw bytes; of the mode only the owner
execute bit is recorded.
"""

import os

from cpython.buffer cimport PyBUF_READ
from cpython.exc cimport PyErr_CheckSignals
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.errno cimport EINTR, ENOMEM, errno
from libc.stdint cimport int32_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc, qsort, realloc
from libc.string cimport memcpy, memset, strcmp, strlen
from posix.stat cimport (S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISLNK, S_ISREG, S_ISSOCK,
                         S_IXUSR, fstat, fstatat, lstat, struct_stat)
from posix.unistd cimport close, read


cdef extern from "<fcntl.h>" nogil:
    int openat(int dirfd, const char *path, int flags)
    int posix_fadvise(int fd, long offset, long length, int advice)
    int AT_FDCWD
    int AT_SYMLINK_NOFOLLOW
    int O_RDONLY, O_NOFOLLOW, O_CLOEXEC, O_NONBLOCK, O_NOCTTY, O_DIRECTORY
    int POSIX_FADV_SEQUENTIAL

cdef extern from "<unistd.h>" nogil:
    ssize_t readlinkat(int dirfd, const char *path, char *buf, size_t size)

cdef extern from "<dirent.h>" nogil:
    ctypedef struct DIR:
        pass
    cdef struct dirent:
        unsigned char d_type
        char d_name[256]
    DIR *fdopendir(int fd)
    dirent *readdir(DIR *d)
    int closedir(DIR *d)
    int dirfd(DIR *d)
    enum:
        DT_UNKNOWN, DT_REG, DT_DIR, DT_LNK, DT_FIFO, DT_SOCK, DT_CHR, DT_BLK

cdef extern from "scan_refs.h" nogil:
    ctypedef struct reftab:
        int32_t n
    ctypedef struct refcarry:
        size_t tail_len
    void ref_carry_reset(refcarry *c)
    void ref_feed(const reftab *t, uint8_t *found, refcarry *c, const uint8_t *s, size_t n)


cdef enum:
    # Symlink targets this long or longer are refused (Linux caps them at 4095).
    TARGET_MAX = 4096
    # Most buffers a walk rotates through when the sink works asynchronously.
    NBUF_MAX = 4


cdef struct Walk:
    uint8_t *buf         # pending NAR bytes, handed to the sink when full
    uint8_t *bufs[NBUF_MAX]
    PyObject *tickets[NBUF_MAX]  # owned: what the sink returned for each buffer in use
    int nbuf
    int cur              # bufs[cur] is buf
    size_t cap
    size_t len
    uint64_t flushed     # bytes already handed to the sink
    PyObject *sink
    const reftab *tab    # NULL: no reference scanning
    uint8_t *found
    refcarry carry
    char *path           # current path, for error messages only
    size_t path_len
    size_t path_cap


cdef struct Entry:
    char *name
    unsigned char dtype


class NarError(ValueError):
    """A path a NAR cannot hold, or one that changed while being read."""

    def __init__(self, path, message):
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


cdef object _path_str(Walk *w):
    return os.fsdecode(w.path[:w.path_len])


cdef int fail_errno(Walk *w, int err, const char *what) except -1 with gil:
    raise OSError(err, f"{what.decode()}: {os.strerror(err)}", _path_str(w))


cdef int fail_close(Walk *w, int fd, const char *what) except -1 nogil:
    # Take errno before close() may change it.
    cdef int err = errno
    close(fd)
    return fail_errno(w, err, what)


cdef int fail(Walk *w, const char *message) except -1 with gil:
    raise NarError(_path_str(w), message.decode())


cdef int flush(Walk *w) except -1 nogil:
    # A sink returning None is done with the view. A sink returning a ticket
    # (anything with .wait(), e.g. a threading.Event) may still be reading
    # it: the buffer is reused only after ticket.wait(), and meanwhile the
    # walk fills the next buffer. That is how hashing overlaps reading.
    if w.len == 0:
        return 0
    with gil:
        ticket = (<object>w.sink)(PyMemoryView_FromMemory(<char *>w.buf, w.len, PyBUF_READ))
        if ticket is not None:
            Py_INCREF(ticket)
            w.tickets[w.cur] = <PyObject *>ticket
        PyErr_CheckSignals()  # Ctrl-C stops a long walk at the next buffer
    w.flushed += w.len
    w.len = 0
    w.cur = (w.cur + 1) % w.nbuf
    w.buf = w.bufs[w.cur]
    return wait_ticket(w, w.cur)


cdef int wait_ticket(Walk *w, int k) except -1 with gil:
    cdef PyObject *ticket = w.tickets[k]
    if ticket == NULL:
        return 0
    w.tickets[k] = NULL
    try:
        (<object>ticket).wait()
    finally:
        Py_XDECREF(ticket)
    return 0


cdef int put(Walk *w, const void *data, size_t n) except -1 nogil:
    cdef const uint8_t *p = <const uint8_t *>data
    cdef size_t room
    while n:
        if w.len == w.cap:
            flush(w)
        room = w.cap - w.len
        if room > n:
            room = n
        memcpy(w.buf + w.len, p, room)
        w.len += room
        p += room
        n -= room
    return 0


cdef int put_u64(Walk *w, uint64_t v) except -1 nogil:
    cdef uint8_t le[8]
    cdef int i
    for i in range(8):
        le[i] = <uint8_t>(v >> (8 * i))
    return put(w, le, 8)


cdef int put_pad(Walk *w, uint64_t n) except -1 nogil:
    cdef uint8_t zeros[8]
    memset(zeros, 0, 8)
    if n % 8:
        put(w, zeros, 8 - n % 8)
    return 0


cdef int put_str(Walk *w, const char *s, size_t n) except -1 nogil:
    put_u64(w, n)
    put(w, s, n)
    return put_pad(w, n)


cdef inline int put_tok(Walk *w, const char *s) except -1 nogil:
    return put_str(w, s, strlen(s))


cdef inline void scan(Walk *w, const void *s, size_t n) noexcept nogil:
    # Each NAR string is scanned on its own: the framing around strings
    # (lengths < 2^56, zero padding) holds no base32 bytes, so no hash
    # part can straddle two strings in Nix's scan of the whole NAR either.
    if w.tab != NULL:
        ref_feed(w.tab, w.found, &w.carry, <const uint8_t *>s, n)


cdef int path_push(Walk *w, const char *name) except -1 nogil:
    cdef size_t n = strlen(name)
    cdef char *p
    if w.path_len + n + 2 > w.path_cap:
        p = <char *>realloc(w.path, 2 * w.path_cap + n + 2)
        if p == NULL:
            return fail_errno(w, ENOMEM, "path")
        w.path = p
        w.path_cap = 2 * w.path_cap + n + 2
    w.path[w.path_len] = b'/'
    memcpy(w.path + w.path_len + 1, name, n)
    w.path_len += n + 1
    return 0


cdef int dump_file(Walk *w, int dfd, const char *name) except -1 nogil:
    cdef struct_stat before, after
    cdef uint64_t left, size
    cdef size_t want
    cdef ssize_t got
    cdef int fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
    if fd < 0:
        return fail_errno(w, errno, "cannot open")
    if fstat(fd, &before) != 0:
        return fail_close(w, fd, "cannot stat")
    if not S_ISREG(before.st_mode):
        close(fd)
        return fail(w, "changed type while being read")
    size = <uint64_t>before.st_size
    if size > (1 << 20):
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL)
    put_tok(w, "(")
    put_tok(w, "type")
    put_tok(w, "regular")
    if before.st_mode & S_IXUSR:
        put_tok(w, "executable")
        put_tok(w, "")
    put_tok(w, "contents")
    put_u64(w, size)
    ref_carry_reset(&w.carry)
    left = size
    while left:
        if w.len == w.cap:
            flush(w)
        want = w.cap - w.len
        if want > left:
            want = <size_t>left
        got = read(fd, w.buf + w.len, want)
        if got < 0:
            if errno == EINTR:
                continue
            return fail_close(w, fd, "cannot read")
        if got == 0:
            close(fd)
            return fail(w, "file shrank while being read")
        scan(w, w.buf + w.len, <size_t>got)
        w.len += <size_t>got
        left -= <uint64_t>got
    # Growth or rewrite during the read would make the NAR we hashed wrong.
    if fstat(fd, &after) != 0:
        return fail_close(w, fd, "cannot stat")
    close(fd)
    if (after.st_size != before.st_size or after.st_mtim.tv_sec != before.st_mtim.tv_sec
            or after.st_mtim.tv_nsec != before.st_mtim.tv_nsec):
        return fail(w, "file changed while being read")
    put_pad(w, size)
    return put_tok(w, ")")


cdef int dump_link(Walk *w, int dfd, const char *name) except -1 nogil:
    cdef char target[TARGET_MAX]
    cdef ssize_t n = readlinkat(dfd, name, target, TARGET_MAX)
    if n < 0:
        return fail_errno(w, errno, "cannot read symlink")
    if n >= TARGET_MAX:
        return fail(w, "symlink target too long")
    put_tok(w, "(")
    put_tok(w, "type")
    put_tok(w, "symlink")
    put_tok(w, "target")
    ref_carry_reset(&w.carry)
    scan(w, target, <size_t>n)
    put_str(w, target, <size_t>n)
    return put_tok(w, ")")


cdef int entry_cmp(const void *a, const void *b) noexcept nogil:
    # strcmp compares as unsigned char: raw byte order, as Nix sorts.
    return strcmp((<const Entry *>a).name, (<const Entry *>b).name)


cdef int read_entries(Walk *w, DIR *d, Entry **out, size_t *count, char **arena_out) except -1 nogil:
    """Every name in d except . and .., sorted by bytes (arena owns the names)."""
    cdef size_t n = 0, cap = 0, used = 0, acap = 0, i, ln
    cdef size_t *offs = NULL
    cdef unsigned char *types = NULL
    cdef char *arena = NULL
    cdef Entry *ents = NULL
    cdef dirent *de
    cdef void *p
    while True:
        errno = 0
        de = readdir(d)
        if de == NULL:
            break
        if de.d_name[0] == b'.' and (de.d_name[1] == 0 or (de.d_name[1] == b'.' and de.d_name[2] == 0)):
            continue
        ln = strlen(de.d_name) + 1
        if n == cap:
            cap = cap * 2 + 16
            p = realloc(offs, cap * sizeof(size_t))
            if p == NULL:
                break
            offs = <size_t *>p
            p = realloc(types, cap)
            if p == NULL:
                break
            types = <unsigned char *>p
        if used + ln > acap:
            acap = acap * 2 + ln + 1024
            p = realloc(arena, acap)
            if p == NULL:
                break
            arena = <char *>p
        memcpy(arena + used, de.d_name, ln)
        offs[n] = used
        types[n] = de.d_type
        used += ln
        n += 1
    if de != NULL or errno != 0:
        # Out of memory (loop broke with an entry in hand) or readdir failed.
        free(offs)
        free(types)
        free(arena)
        return fail_errno(w, errno if errno else ENOMEM, "cannot list directory")
    if n:
        ents = <Entry *>malloc(n * sizeof(Entry))
        if ents == NULL:
            free(offs)
            free(types)
            free(arena)
            return fail_errno(w, ENOMEM, "cannot list directory")
        for i in range(n):
            ents[i].name = arena + offs[i]
            ents[i].dtype = types[i]
        qsort(ents, n, sizeof(Entry), entry_cmp)
    free(offs)
    free(types)
    out[0] = ents
    count[0] = n
    arena_out[0] = arena
    return 0


cdef int dump_dir(Walk *w, int dfd, const char *name) except -1 nogil:
    cdef Entry *ents = NULL
    cdef char *arena = NULL
    cdef size_t n = 0, i, saved
    cdef DIR *d
    cdef int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    if fd < 0:
        return fail_errno(w, errno, "cannot open directory")
    d = fdopendir(fd)
    if d == NULL:
        return fail_close(w, fd, "cannot open directory")
    try:
        read_entries(w, d, &ents, &n, &arena)
        put_tok(w, "(")
        put_tok(w, "type")
        put_tok(w, "directory")
        saved = w.path_len
        for i in range(n):
            put_tok(w, "entry")
            put_tok(w, "(")
            put_tok(w, "name")
            ref_carry_reset(&w.carry)
            scan(w, ents[i].name, strlen(ents[i].name))
            put_tok(w, ents[i].name)
            put_tok(w, "node")
            path_push(w, ents[i].name)
            dump_entry(w, dirfd(d), ents[i].name, ents[i].dtype)
            w.path_len = saved
            put_tok(w, ")")
        put_tok(w, ")")
    finally:
        free(ents)
        free(arena)
        closedir(d)
    return 0


cdef unsigned char dtype_of(const struct_stat *st) noexcept nogil:
    if S_ISREG(st.st_mode):
        return DT_REG
    if S_ISDIR(st.st_mode):
        return DT_DIR
    if S_ISLNK(st.st_mode):
        return DT_LNK
    if S_ISFIFO(st.st_mode):
        return DT_FIFO
    if S_ISSOCK(st.st_mode):
        return DT_SOCK
    if S_ISCHR(st.st_mode):
        return DT_CHR
    if S_ISBLK(st.st_mode):
        return DT_BLK
    return DT_UNKNOWN


cdef int dump_entry(Walk *w, int dfd, const char *name, unsigned char dtype) except -1 nogil:
    cdef struct_stat st
    if dtype == DT_UNKNOWN:
        # Some filesystems do not fill d_type.
        if fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0:
            return fail_errno(w, errno, "cannot stat")
        dtype = dtype_of(&st)
    if dtype == DT_REG:
        return dump_file(w, dfd, name)
    if dtype == DT_DIR:
        return dump_dir(w, dfd, name)
    if dtype == DT_LNK:
        return dump_link(w, dfd, name)
    if dtype == DT_FIFO:
        return fail(w, "a fifo cannot go into a NAR")
    if dtype == DT_SOCK:
        return fail(w, "a socket cannot go into a NAR")
    if dtype == DT_CHR or dtype == DT_BLK:
        return fail(w, "a device node cannot go into a NAR")
    return fail(w, "unsupported file type")


cdef int dump_root(Walk *w, const char *path) except -1 nogil:
    cdef struct_stat st
    if lstat(path, &st) != 0:
        return fail_errno(w, errno, "cannot stat")
    put_tok(w, "nix-archive-1")
    dump_entry(w, AT_FDCWD, path, dtype_of(&st))
    return flush(w)


def nar_walk(bytes path not None, sink not None, size_t table=0, uint8_t[::1] found=None,
             size_t bufsize=1 << 20, int nbuf=1):
    """Stream the NAR of `path` into `sink(memoryview)`; return the NAR size.

    `sink` either consumes the view before returning None, or returns a
    ticket whose .wait() returns once it is done with the view; `nbuf`
    buffers (1..4) rotate, so up to nbuf - 1 views are in the sink's hands
    while the walk goes on. All tickets are waited for before returning.
    `table` is the address of a scan.RefTable's C table (0: no scanning);
    `found[i]` is set to 1 for each candidate i whose hash part occurs.
    Raises OSError (filename set) or NarError naming the offending path.
    """
    cdef Walk w
    cdef const char *cpath = path
    cdef size_t plen = len(path)
    cdef int k
    cdef bint nomem = False
    if b"\0" in path:
        raise ValueError("path contains a NUL byte")
    if bufsize < 4096:
        bufsize = 4096
    if nbuf < 1 or nbuf > NBUF_MAX:
        raise ValueError(f"nbuf must be 1..{NBUF_MAX}")
    memset(&w, 0, sizeof(Walk))
    w.cap = bufsize
    w.nbuf = nbuf
    w.sink = <PyObject *>sink
    if table:
        w.tab = <const reftab *>table
        if found is None or <size_t>found.shape[0] < <size_t>w.tab.n:
            raise ValueError("found must have one byte per candidate")
        w.found = &found[0] if found.shape[0] else NULL
    for k in range(nbuf):
        w.bufs[k] = <uint8_t *>malloc(bufsize)
        nomem = nomem or w.bufs[k] == NULL
    w.buf = w.bufs[0]
    w.path_cap = plen + 256
    w.path = <char *>malloc(w.path_cap)
    try:
        if nomem or w.path == NULL:
            raise MemoryError()
        memcpy(w.path, cpath, plen)
        w.path_len = plen
        with nogil:
            dump_root(&w, cpath)
    finally:
        # Even on error, no buffer is freed while the sink may still read it.
        for k in range(nbuf):
            wait_ticket(&w, k)
        for k in range(nbuf):
            free(w.bufs[k])
        free(w.path)
    return w.flushed
