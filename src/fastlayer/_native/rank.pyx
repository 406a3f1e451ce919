# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Graph kernels for closure graphs and layer planning, over CSR arrays
(row = path, columns = its references).

Loading: `clean_rows`, `topo_order` (cycle check), `transpose`. Popularity:
`max_path_count`, `path_counts`, `dfs_postorder`, `ancestor_sums`, `normalize`.
Walks for auto-layer and pipelines: `reach`, `group_closure_sizes`.
Everything works on int32 node ids with the GIL released; no Python object is
touched per node. The popularity sums are the expensive part: see `ancestor_sums`.
"""

import numpy as np

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp, memcpy, memset

cnp.import_array()

# Limbs of 60 bits keep a byte-table entry (a sum of 8 limbs) below 2**63.
cdef enum:
    LIMB_BITS = 60
cdef uint64_t LIMB_MASK = (<uint64_t>1 << LIMB_BITS) - 1


def topo_order(const int32_t[::1] indptr, const int32_t[::1] indices):
    """Kahn order (every path before the paths it references).

    Returns an int32 array; it is shorter than the node count exactly when the
    graph has a cycle (the missing nodes are those a cycle keeps from being freed).
    """
    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef cnp.ndarray[int32_t, ndim=1] order_arr = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] order = order_arr
    cdef int32_t* indeg = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef Py_ssize_t i, e, head = 0, tail = 0
    cdef int32_t v, c
    if indeg == NULL:
        raise MemoryError()
    with nogil:
        memset(indeg, 0, (n + 1) * sizeof(int32_t))
        for e in range(indptr[n]):
            indeg[indices[e]] += 1
        for i in range(n):
            if indeg[i] == 0:
                order[tail] = <int32_t>i
                tail += 1
        while head < tail:
            v = order[head]
            head += 1
            for e in range(indptr[v], indptr[v + 1]):
                c = indices[e]
                indeg[c] -= 1
                if indeg[c] == 0:
                    order[tail] = c
                    tail += 1
    free(indeg)
    return order_arr[:tail]


def dfs_postorder(const int32_t[::1] indptr, const int32_t[::1] indices):
    """Postorder of a DFS started at every root in id order (children before parents).

    Consecutive nodes in this order tend to share descendants, which is what makes
    chunking sources in `ancestor_sums` cheap.
    """
    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef cnp.ndarray[int32_t, ndim=1] out_arr = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] out = out_arr
    cdef int32_t* seen = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t* st_node = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t* st_pos = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef char* referenced = <char*>malloc(n + 1)
    cdef Py_ssize_t cnt = 0, i, e
    if seen == NULL or st_node == NULL or st_pos == NULL or referenced == NULL:
        free(seen)
        free(st_node)
        free(st_pos)
        free(referenced)
        raise MemoryError()
    with nogil:
        memset(seen, 0, (n + 1) * sizeof(int32_t))
        memset(referenced, 0, n + 1)
        for e in range(indptr[n]):
            referenced[indices[e]] = 1
        # Roots first, then anything left (only possible in a cyclic graph).
        for i in range(n):
            if not referenced[i]:
                cnt = _dfs(indptr, indices, <int32_t>i, seen, 1, st_node, st_pos, &out[0], cnt)
        for i in range(n):
            cnt = _dfs(indptr, indices, <int32_t>i, seen, 1, st_node, st_pos, &out[0], cnt)
    free(seen)
    free(referenced)
    free(st_node)
    free(st_pos)
    return out_arr[:cnt]


cdef Py_ssize_t _dfs(const int32_t[::1] indptr, const int32_t[::1] indices, int32_t start,
                     int32_t* seen, int32_t stamp, int32_t* st_node, int32_t* st_pos,
                     int32_t* out, Py_ssize_t cnt) noexcept nogil:
    """Iterative DFS from `start` over nodes whose seen != stamp; appends postorder."""
    cdef Py_ssize_t top = 0
    cdef int32_t v, c, p
    if seen[start] == stamp:
        return cnt
    seen[start] = stamp
    st_node[0] = start
    st_pos[0] = indptr[start]
    while top >= 0:
        v = st_node[top]
        p = st_pos[top]
        if p < indptr[v + 1]:
            st_pos[top] = p + 1
            c = indices[p]
            if seen[c] != stamp:
                seen[c] = stamp
                top += 1
                st_node[top] = c
                st_pos[top] = indptr[c]
        else:
            out[cnt] = v
            cnt += 1
            top -= 1
    return cnt


def path_counts(const int32_t[::1] indptr, const int32_t[::1] indices,
                const int32_t[::1] order, int limbs):
    """W(v) = number of distinct paths from the virtual super-root to v.

    Returned as uint64[limbs, n] in base 2**60, or None when `limbs` is too few.
    One pass over the edges in topological order: O(limbs * (V + E)).
    """
    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef cnp.ndarray[uint64_t, ndim=2] w_arr = np.zeros((limbs, n), dtype=np.uint64)
    cdef uint64_t[:, ::1] w = w_arr
    cdef Py_ssize_t i, e, k
    cdef int32_t v, c
    cdef uint64_t carry, s
    cdef bint overflow = False
    cdef char* referenced = <char*>malloc(n + 1)
    # used[v]: limbs of W(v) that may be non-zero; most paths need one.
    cdef int32_t* used = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    if referenced == NULL or used == NULL:
        free(referenced)
        free(used)
        raise MemoryError()
    with nogil:
        memset(referenced, 0, n + 1)
        memset(used, 0, (n + 1) * sizeof(int32_t))
        for e in range(indptr[n]):
            referenced[indices[e]] = 1
        for i in range(n):
            if not referenced[i]:
                w[0, i] = 1  # a root: the single path S -> root
                used[i] = 1
        for i in range(order.shape[0]):
            v = order[i]
            for e in range(indptr[v], indptr[v + 1]):
                c = indices[e]
                carry = 0
                k = 0
                while k < used[v] or (carry and k < limbs):
                    s = w[k, c] + w[k, v] + carry
                    w[k, c] = s & LIMB_MASK
                    carry = s >> LIMB_BITS
                    k += 1
                if carry:
                    overflow = True
                    break
                if k > used[c]:
                    used[c] = <int32_t>k
            if overflow:
                break
    free(used)
    free(referenced)
    return None if overflow else w_arr


def ancestor_sums(const int32_t[::1] indptr, const int32_t[::1] indices,
                  const int32_t[::1] source_order, const uint64_t[:, ::1] weights,
                  int words=8, int threads=1):
    """S_l(d) = sum of weights[l, u] over u in {d} + ancestors(d), exactly, per limb l.

    Sources u are taken `64 * words` at a time in `source_order`. For each chunk, a
    DFS collects the union U of their descendant sets, numbering U locally (its
    edges copied as local ids), a bitset per node (one bit per source) is pushed
    down U in topological order, and each node's weighted popcount is read through
    256-entry byte tables. Cost: O(sum over chunks of words * (|U| + |E(U)|)) time
    (worst case O(V * E / 64), when every closure is the whole graph; closure graphs
    have small closures next to each other in DFS order, so U stays close to one
    closure) and O(V * words) extra memory per thread. The local numbering keeps a
    chunk's bitsets and edges in a few hundred KiB (cache) instead of scattered over
    V * words words. Chunks are independent: `threads` workers take every
    threads-th chunk, each with its own scratch and 128-bit sums, added up at the end.
    Weights must be < 2**60; results are 128-bit, returned as (lo, hi) uint64[L, n].
    """
    import threading

    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef Py_ssize_t L = weights.shape[0]
    threads = max(1, threads)
    # Per thread: node-major (lo, hi) pairs, acc[v, l] = (lo, hi): one node's sums
    # share a cache line or two.
    outs = [np.zeros((n, L, 2), dtype=np.uint64) for _ in range(threads)]
    errors = []

    def work(int t):
        try:
            _sums_worker(indptr, indices, source_order, weights, words, t, threads, outs[t])
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    if threads == 1:
        work(0)
    else:
        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    if errors:
        raise errors[0]
    lo_arr = np.empty((L, n), dtype=np.uint64)
    hi_arr = np.empty((L, n), dtype=np.uint64)
    cdef uint64_t[:, ::1] lo = lo_arr
    cdef uint64_t[:, ::1] hi = hi_arr
    cdef uint64_t[:, :, ::1] acc
    cdef Py_ssize_t v, l
    cdef u128 s
    for t in range(threads):
        acc = outs[t]
        with nogil:
            for v in range(n):
                for l in range(L):
                    s = _u128(acc[v, l, 0], acc[v, l, 1])
                    if t:
                        s = s + _u128(lo[l, v], hi[l, v])
                    lo[l, v] = <uint64_t>s
                    hi[l, v] = <uint64_t>(s >> 64)
        outs[t] = None
    return lo_arr, hi_arr


cdef extern from *:
    """
    typedef unsigned __int128 fl_u128;
    """
    ctypedef unsigned long long u128 "fl_u128"


cdef inline u128 _u128(uint64_t lo, uint64_t hi) noexcept nogil:
    return (<u128>hi << 64) | lo


def _sums_worker(const int32_t[::1] indptr, const int32_t[::1] indices,
                 const int32_t[::1] source_order, const uint64_t[:, ::1] weights,
                 int words, int first, int step, uint64_t[:, :, ::1] acc):
    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef Py_ssize_t L = weights.shape[0]
    cdef Py_ssize_t W = words
    cdef Py_ssize_t B = 64 * W
    cdef Py_ssize_t m_edges = indptr[n]
    # Chunk-local: node of each local id, local ids in DFS postorder, local CSR.
    cdef int32_t* node_of = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t* post = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int64_t* lptr = <int64_t*>malloc((n + 2) * sizeof(int64_t))
    cdef int32_t* ledge = <int32_t*>malloc((m_edges + 1) * sizeof(int32_t))
    cdef uint64_t* mask = <uint64_t*>malloc((n * W + 1) * sizeof(uint64_t))
    # Global: the chunk that last saw each node and its local id there.
    cdef int32_t* seen = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t* loc = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t* st_node = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t* st_pos = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    # table[((k * 8 + b) * 256 + m) * Lc + l] = limb l of the sum of the weights of
    # the sources whose bits are set in byte value m at byte b of word k (< 2**63).
    cdef uint64_t* table = <uint64_t*>malloc(W * 8 * 256 * L * sizeof(uint64_t))
    cdef u128* full = <u128*>malloc(W * L * sizeof(u128))
    cdef u128* s = <u128*>malloc(L * sizeof(u128))
    cdef uint64_t* bw = <uint64_t*>malloc(8 * L * sizeof(uint64_t))
    cdef uint64_t ALL_ONES = ~(<uint64_t>0)
    cdef Py_ssize_t nsrc = source_order.shape[0]
    cdef Py_ssize_t start, stop, j, cnt, npost, i, e, k, b, l, m, Lc, top, nl
    cdef int64_t etop
    cdef int32_t v, c, p, a, cid = 0
    cdef uint64_t word, byte
    cdef u128 x
    cdef uint64_t* tb
    cdef uint64_t* row
    cdef uint64_t* mv
    cdef uint64_t* mc
    cdef int lowbit[256]
    for m in range(1, 256):
        b = 0
        while not (m >> b) & 1:
            b += 1
        lowbit[m] = <int>b
    lowbit[0] = 0
    if (node_of == NULL or post == NULL or lptr == NULL or ledge == NULL or mask == NULL
            or seen == NULL or loc == NULL or st_node == NULL or st_pos == NULL
            or table == NULL or full == NULL or s == NULL or bw == NULL):
        free(node_of); free(post); free(lptr); free(ledge); free(mask); free(seen)
        free(loc); free(st_node); free(st_pos); free(table); free(full); free(s); free(bw)
        raise MemoryError()
    with nogil:
        memset(seen, 0, (n + 1) * sizeof(int32_t))
        start = first * B
        while start < nsrc:
            stop = min(start + B, nsrc)
            cid += 1
            # DFS from every source of the chunk: local ids in discovery order,
            # each node's edge slots reserved at discovery and filled as walked.
            cnt = 0
            npost = 0
            etop = 0
            for j in range(start, stop):
                v = source_order[j]
                if seen[v] == cid:
                    continue
                seen[v] = cid
                loc[v] = <int32_t>cnt
                node_of[cnt] = v
                lptr[cnt] = etop
                etop += indptr[v + 1] - indptr[v]
                cnt += 1
                top = 0
                st_node[0] = v
                st_pos[0] = indptr[v]
                while top >= 0:
                    v = st_node[top]
                    p = st_pos[top]
                    if p < indptr[v + 1]:
                        st_pos[top] = p + 1
                        c = indices[p]
                        if seen[c] != cid:
                            seen[c] = cid
                            loc[c] = <int32_t>cnt
                            node_of[cnt] = c
                            lptr[cnt] = etop
                            etop += indptr[c + 1] - indptr[c]
                            cnt += 1
                            top += 1
                            st_node[top] = c
                            st_pos[top] = indptr[c]
                        ledge[lptr[loc[v]] + (p - indptr[v])] = loc[c]
                    else:
                        post[npost] = loc[v]
                        npost += 1
                        top -= 1
            lptr[cnt] = etop
            memset(mask, 0, cnt * W * sizeof(uint64_t))
            for j in range(start, stop):
                a = loc[source_order[j]]
                mask[a * W + (j - start) // 64] |= (<uint64_t>1) << ((j - start) % 64)
            # Limbs above the chunk's largest weight are all zero: skip them (deep
            # paths with huge counts have small closures, and the reverse).
            Lc = 1
            for j in range(start, stop):
                for l in range(L - 1, Lc - 1, -1):
                    if weights[l, source_order[j]] != 0:
                        Lc = l + 1
                        break
            # Byte tables: entry m = entry (m without its lowest bit) + that bit's weight.
            for k in range(W):
                for l in range(Lc):
                    full[k * Lc + l] = 0
                for b in range(8):
                    for m in range(8):
                        j = start + k * 64 + b * 8 + m
                        for l in range(Lc):
                            bw[m * Lc + l] = weights[l, source_order[j]] if j < stop else 0
                    tb = table + (k * 8 + b) * 256 * Lc
                    for l in range(Lc):
                        tb[l] = 0
                    for m in range(1, 256):
                        for l in range(Lc):
                            tb[m * Lc + l] = tb[(m & (m - 1)) * Lc + l] + bw[lowbit[m] * Lc + l]
                    for l in range(Lc):
                        full[k * Lc + l] += tb[255 * Lc + l]
            # Reverse DFS postorder is a topological order of U.
            for i in range(npost - 1, -1, -1):
                a = post[i]
                mv = mask + a * W
                for e in range(lptr[a], lptr[a + 1]):
                    mc = mask + ledge[e] * W
                    for k in range(W):
                        mc[k] |= mv[k]
            for a in range(cnt):
                mv = mask + a * W
                v = node_of[a]
                # A path discovered right after its referrer often has the same
                # sources (its only way in): same sums as the previous local id.
                if a > 0 and memcmp(mv, mv - W, W * sizeof(uint64_t)) == 0:
                    for l in range(Lc):
                        x = _u128(acc[v, l, 0], acc[v, l, 1]) + s[l]
                        acc[v, l, 0] = <uint64_t>x
                        acc[v, l, 1] = <uint64_t>(x >> 64)
                    continue
                for l in range(Lc):
                    s[l] = 0
                for k in range(W):
                    word = mv[k]
                    if word == 0:
                        continue
                    if word == ALL_ONES:
                        # Reached from every source of the word (deep paths, the
                        # bulk of U): the word's precomputed total.
                        for l in range(Lc):
                            s[l] += full[k * Lc + l]
                        continue
                    tb = table + k * 8 * 256 * Lc
                    for b in range(8):
                        byte = (word >> (8 * b)) & 255
                        if byte:
                            row = tb + (b * 256 + byte) * Lc
                            for l in range(Lc):
                                s[l] += row[l]
                for l in range(Lc):
                    x = _u128(acc[v, l, 0], acc[v, l, 1]) + s[l]
                    acc[v, l, 0] = <uint64_t>x
                    acc[v, l, 1] = <uint64_t>(x >> 64)
            start += B * step
    free(node_of); free(post); free(lptr); free(ledge); free(mask); free(seen)
    free(loc); free(st_node); free(st_pos); free(table); free(full); free(s); free(bw)


def reach(const int32_t[::1] indptr, const int32_t[::1] indices, const int32_t[::1] starts,
          int32_t[::1] mark, int32_t stamp, bint include_starts):
    """Nodes reachable from `starts` (DFS order), marking each with `stamp` in `mark`.

    Nodes already carrying `stamp` are treated as visited. Without include_starts
    a start is only reported when it is reachable from another start.
    """
    cdef Py_ssize_t n = indptr.shape[0] - 1
    cdef cnp.ndarray[int32_t, ndim=1] out_arr = np.empty(n, dtype=np.int32)
    cdef int32_t[::1] out = out_arr
    cdef int32_t* stack = <int32_t*>malloc((n + starts.shape[0] + 1) * sizeof(int32_t))
    cdef Py_ssize_t top = 0, cnt = 0, i, e
    cdef int32_t v, c
    if stack == NULL:
        raise MemoryError()
    with nogil:
        for i in range(starts.shape[0]):
            v = starts[i]
            if include_starts:
                if mark[v] != stamp:
                    mark[v] = stamp
                    out[cnt] = v
                    cnt += 1
                    stack[top] = v
                    top += 1
            else:
                stack[top] = v
                top += 1
        while top > 0:
            top -= 1
            v = stack[top]
            for e in range(indptr[v], indptr[v + 1]):
                c = indices[e]
                if mark[c] != stamp:
                    mark[c] = stamp
                    out[cnt] = c
                    cnt += 1
                    stack[top] = c
                    top += 1
    free(stack)
    return out_arr[:cnt]


def normalize(const uint64_t[:, ::1] lo, const uint64_t[:, ::1] hi):
    """Limb sums (128-bit each, limb l weighing 2**(60*l)) -> base-2**60 digits.

    Returns uint64[L + 2, n], least significant first, each digit < 2**60: exact
    values that numpy can compare digit by digit.
    """
    cdef Py_ssize_t L = lo.shape[0], n = lo.shape[1], i, l
    cdef cnp.ndarray[uint64_t, ndim=2] out_arr = np.zeros((L + 2, n), dtype=np.uint64)
    cdef uint64_t[:, ::1] out = out_arr
    cdef uint64_t clo, chi, a, b
    with nogil:
        for i in range(n):
            clo = 0  # carry, 128-bit as (chi, clo)
            chi = 0
            for l in range(L + 2):
                a = lo[l, i] if l < L else 0
                b = hi[l, i] if l < L else 0
                # (b, a) += (chi, clo)
                a = a + clo
                b = b + chi + (1 if a < clo else 0)
                out[l, i] = a & LIMB_MASK
                # carry = (b, a) >> 60
                clo = (a >> LIMB_BITS) | (b << (64 - LIMB_BITS))
                chi = b >> LIMB_BITS
    return out_arr


def max_path_count(const int32_t[::1] indptr, const int32_t[::1] indices,
                   const int32_t[::1] order):
    """The largest W as a float (inf past 2**1024): sizes the exact pass."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, i, e
    cdef double* w = <double*>malloc((n + 1) * sizeof(double))
    cdef double best = 0.0
    cdef int32_t v
    cdef char* referenced = <char*>malloc(n + 1)
    if w == NULL or referenced == NULL:
        free(w)
        free(referenced)
        raise MemoryError()
    with nogil:
        memset(referenced, 0, n + 1)
        for e in range(indptr[n]):
            referenced[indices[e]] = 1
        for i in range(n):
            w[i] = 0.0 if referenced[i] else 1.0
        for i in range(order.shape[0]):
            v = order[i]
            if w[v] > best:
                best = w[v]
            for e in range(indptr[v], indptr[v + 1]):
                w[indices[e]] += w[v]
    free(w)
    free(referenced)
    return best


def transpose(const int32_t[::1] indptr, const int32_t[::1] indices):
    """CSR of the reversed graph (row = path, columns = its referrers, ascending),
    by counting sort: O(V + E)."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, i, e
    cdef int64_t m = indptr[n]
    cdef cnp.ndarray[int32_t, ndim=1] rptr_arr = np.zeros(n + 1, dtype=np.int32)
    cdef cnp.ndarray[int32_t, ndim=1] ridx_arr = np.empty(m, dtype=np.int32)
    cdef int32_t[::1] rptr = rptr_arr
    cdef int32_t[::1] ridx = ridx_arr
    cdef int32_t* fill = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t c
    if fill == NULL:
        raise MemoryError()
    with nogil:
        for e in range(m):
            rptr[indices[e] + 1] += 1
        for i in range(n):
            rptr[i + 1] += rptr[i]
        for i in range(n):
            fill[i] = rptr[i]
        for i in range(n):
            for e in range(indptr[i], indptr[i + 1]):
                c = indices[e]
                ridx[fill[c]] = <int32_t>i
                fill[c] += 1
    free(fill)
    return rptr_arr, ridx_arr


def clean_rows(const int64_t[::1] counts, const int32_t[::1] cols):
    """CSR from per-row reference lists: self references dropped, repeats dropped
    (first occurrence kept, order otherwise kept). O(V + E), one stamp array."""
    cdef Py_ssize_t n = counts.shape[0], i, e, pos = 0, out = 0
    cdef cnp.ndarray[int32_t, ndim=1] indptr_arr = np.zeros(n + 1, dtype=np.int32)
    cdef cnp.ndarray[int32_t, ndim=1] idx_arr = np.empty(cols.shape[0], dtype=np.int32)
    cdef int32_t[::1] indptr = indptr_arr
    cdef int32_t[::1] idx = idx_arr
    cdef int32_t* stamp = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t c
    if stamp == NULL:
        raise MemoryError()
    with nogil:
        for i in range(n):
            stamp[i] = -1
        for i in range(n):
            for e in range(pos, pos + counts[i]):
                c = cols[e]
                if c != i and stamp[c] != i:
                    stamp[c] = <int32_t>i
                    idx[out] = c
                    out += 1
            pos += counts[i]
            indptr[i + 1] = <int32_t>out
    free(stamp)
    return indptr_arr, idx_arr[:out].copy()


def group_closure_sizes(const int32_t[::1] indptr, const int32_t[::1] indices,
                        const int64_t[::1] rows, const int64_t[::1] starts,
                        const int64_t[::1] nar_size):
    """For each group g = rows[starts[g]:starts[g+1]], the narSize total of the
    group's closure (its paths and everything they reference). One DFS per group."""
    cdef Py_ssize_t n = indptr.shape[0] - 1, ng = starts.shape[0] - 1, g, i, e
    cdef cnp.ndarray[int64_t, ndim=1] out_arr = np.zeros(ng, dtype=np.int64)
    cdef int64_t[::1] out = out_arr
    cdef int32_t* mark = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef int32_t* stack = <int32_t*>malloc((n + 1) * sizeof(int32_t))
    cdef Py_ssize_t top
    cdef int32_t v, c
    cdef int64_t total
    if mark == NULL or stack == NULL:
        free(mark)
        free(stack)
        raise MemoryError()
    with nogil:
        memset(mark, 0, (n + 1) * sizeof(int32_t))
        for g in range(ng):
            total = 0
            top = 0
            for i in range(starts[g], starts[g + 1]):
                v = <int32_t>rows[i]
                if mark[v] != g + 1:
                    mark[v] = <int32_t>(g + 1)
                    total += nar_size[v]
                    stack[top] = v
                    top += 1
            while top > 0:
                top -= 1
                v = stack[top]
                for e in range(indptr[v], indptr[v + 1]):
                    c = indices[e]
                    if mark[c] != g + 1:
                        mark[c] = <int32_t>(g + 1)
                        total += nar_size[c]
                        stack[top] = c
                        top += 1
            out[g] = total
    free(mark)
    free(stack)
    return out_arr


cdef extern from "stdlib.h":
    void qsort_r(void *base, size_t nmemb, size_t size,
                 int (*compar)(const void *, const void *, void *) noexcept nogil,
                 void *arg) nogil

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL


ctypedef struct tie_item:
    uint64_t head   # the key's first 16 bytes, big-endian: most compares end here
    uint64_t head2
    int64_t off     # the whole key in the buffer
    int64_t len
    int64_t idx


cdef int _tie_cmp(const void *pa, const void *pb, void *arg) noexcept nogil:
    cdef const tie_item *a = <const tie_item *>pa
    cdef const tie_item *b = <const tie_item *>pb
    cdef const char *buf = <const char *>arg
    cdef int c
    if a.head != b.head:
        return -1 if a.head < b.head else 1
    if a.head2 != b.head2:
        return -1 if a.head2 < b.head2 else 1
    c = memcmp(buf + a.off, buf + b.off, min(a.len, b.len))
    if c == 0:
        if a.len != b.len:
            return -1 if a.len < b.len else 1
        return -1 if a.idx < b.idx else (1 if a.idx > b.idx else 0)
    return c


def tie_ranks(list names):
    """Rank of each name under closure-graph.py's tie key (the leading `<hash>`
    dash-field moved to the end), as UTF-8 bytes compare: the order of str.
    Equal keys keep list order."""
    cdef Py_ssize_t n = len(names), i, ln, total = 0
    cdef const char *s
    cdef const char *dash
    cdef int64_t first, pos = 0, k
    cdef tie_item *items = <tie_item *>malloc(max(n, 1) * sizeof(tie_item))
    if items == NULL:
        raise MemoryError()
    for i in range(n):
        PyUnicode_AsUTF8AndSize(names[i], &ln)
        total += ln + 1
    cdef char *buf = <char *>malloc(max(total, 1))
    if buf == NULL:
        free(items)
        raise MemoryError()
    cdef cnp.ndarray[int64_t, ndim=1] ranks_arr = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] ranks = ranks_arr
    try:
        for i in range(n):
            s = PyUnicode_AsUTF8AndSize(names[i], &ln)
            dash = <const char *>memchr(s, 45, ln)  # '-'
            if dash == NULL:
                memcpy(buf + pos, s, ln)
            else:
                first = dash - s
                memcpy(buf + pos, dash + 1, ln - first - 1)
                buf[pos + ln - first - 1] = 45
                memcpy(buf + pos + ln - first, s, first)
            items[i].off = pos
            items[i].len = ln
            items[i].idx = i
            items[i].head = 0
            items[i].head2 = 0
            for k in range(8):
                items[i].head = (items[i].head << 8) | (
                    <unsigned char>buf[pos + k] if k < ln else 0)
                items[i].head2 = (items[i].head2 << 8) | (
                    <unsigned char>buf[pos + 8 + k] if k + 8 < ln else 0)
            pos += ln
        with nogil:
            qsort_r(items, n, sizeof(tie_item), _tie_cmp, buf)
            for i in range(n):
                ranks[items[i].idx] = i
    finally:
        free(items)
        free(buf)
    return ranks_arr


def lines(list names, const int64_t[::1] order):
    """b"".join(names[i].encode() + b"\\n" for i in order), without the objects."""
    cdef Py_ssize_t n = order.shape[0], i, ln, total = 0, pos = 0
    cdef const char *s
    for i in range(n):
        PyUnicode_AsUTF8AndSize(names[order[i]], &ln)
        total += ln + 1
    out = PyBytes_FromStringAndSize(NULL, total)
    cdef char *buf = PyBytes_AS_STRING(out)
    for i in range(n):
        s = PyUnicode_AsUTF8AndSize(names[order[i]], &ln)
        memcpy(buf + pos, s, ln)
        buf[pos + ln] = 10
        pos += ln + 1
    return out
