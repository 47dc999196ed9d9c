"""PyTorch's CPU `argsort` of int64 keys, reproduced exactly, ties included, without PyTorch.

Why this exists: the official z-order scan sorts pixel codes that collide (see `scans.py`), so the
order of the tied pixels -- and with it which pixel every step of a trained z-order model reads --
is whatever torch's default (unstable) `argsort` produces. That order is deterministic: the codes
are built on the CPU, and for a 1-D int64 tensor torch's CPU sort is

- n < 32768 elements: the C++ standard library's `std::sort` (GCC's libstdc++ in the Linux
  wheels) applied to (key, index) pairs compared by key alone;
- n >= 32768: a radix sort, which is stable (ties keep their index order).

`std::sort` in libstdc++ is an introsort, emulated here move for move:

1. `introsort loop` over ranges longer than 16: pick the median of (first+1, middle, last-1) and
   swap it to `first`; Hoare-partition [first+1, last) around it without bounds checks; recurse on
   the right part, loop on the left part. Each level spends one unit of a depth budget of
   2*floor(log2 n); a range that exhausts it is heap-sorted (make_heap, then pop_heap down to one
   element, with libstdc++'s hole-to-leaf-then-sift-up `adjust_heap`).
2. `final insertion sort`: a guarded insertion sort of the first 16 elements, then an unguarded
   linear insertion of every later one (safe because step 1 leaves a minimum among the first 16).

Only the *moves* matter for ties, so every comparison and swap is the library's, in its order.
The ranges of step 1 are disjoint, so processing them from an explicit stack instead of by
recursion gives the same result.

Plain Python (the reference imports NumPy only): ~0.3 s for the longest case, n = 32767, once per
grid size (`scans` caches its tables).
"""
from __future__ import annotations

import numpy as np

__all__ = ["RADIX_MIN", "THRESHOLD", "torch_cpu_argsort", "std_sort_argsort"]

THRESHOLD = 16        # libstdc++ `_S_threshold`: ranges this short are left to insertion sort
RADIX_MIN = 32768     # torch uses its (stable) radix sort for integer keys from this length on


def _swap(key, idx, i, j):
    key[i], key[j] = key[j], key[i]
    idx[i], idx[j] = idx[j], idx[i]


def _move_median_to_first(key, idx, result, a, b, c):
    # The same nested tests as libstdc++, so equal keys pick the same element.
    if key[a] < key[b]:
        if key[b] < key[c]:
            _swap(key, idx, result, b)
        elif key[a] < key[c]:
            _swap(key, idx, result, c)
        else:
            _swap(key, idx, result, a)
    elif key[a] < key[c]:
        _swap(key, idx, result, a)
    elif key[b] < key[c]:
        _swap(key, idx, result, c)
    else:
        _swap(key, idx, result, b)


def _unguarded_partition(key, idx, first, last, pivot):
    # The pivot (at `pivot`, outside [first, last)) stops both scans: no bounds checks, and
    # elements equal to the pivot are swapped, which is what scatters ties.
    while True:
        while key[first] < key[pivot]:
            first += 1
        last -= 1
        while key[pivot] < key[last]:
            last -= 1
        if not first < last:
            return first
        _swap(key, idx, first, last)
        first += 1


def _push_heap(key, idx, first, hole, top, vkey, vidx):
    parent = (hole - 1) // 2
    while hole > top and key[first + parent] < vkey:
        key[first + hole] = key[first + parent]
        idx[first + hole] = idx[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    key[first + hole] = vkey
    idx[first + hole] = vidx


def _adjust_heap(key, idx, first, hole, length, vkey, vidx):
    # libstdc++ walks the hole down to a leaf along the larger child (the right one on ties),
    # then sifts the value up from there.
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if key[first + child] < key[first + child - 1]:
            child -= 1
        key[first + hole] = key[first + child]
        idx[first + hole] = idx[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        key[first + hole] = key[first + child - 1]
        idx[first + hole] = idx[first + child - 1]
        hole = child - 1
    _push_heap(key, idx, first, hole, top, vkey, vidx)


def _heap_sort(key, idx, first, last):
    """`std::__partial_sort(first, last, last)`: make_heap, then sort_heap (pop to the end)."""
    length = last - first
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _adjust_heap(key, idx, first, parent, length, key[first + parent], idx[first + parent])
            if parent == 0:
                break
            parent -= 1
    while last - first > 1:
        last -= 1
        vkey, vidx = key[last], idx[last]
        key[last] = key[first]
        idx[last] = idx[first]
        _adjust_heap(key, idx, first, 0, last - first, vkey, vidx)


def _introsort_loop(key, idx, depth_limit):
    """Step 1 over the whole array; returns how many ranges fell back to heap sort."""
    stack = np.empty((2 * depth_limit + 4, 3), dtype=np.int64)
    stack[0, 0], stack[0, 1], stack[0, 2] = 0, key.size, depth_limit
    top = 1
    heap_sorts = 0
    while top > 0:
        top -= 1
        first, last, depth = stack[top, 0], stack[top, 1], stack[top, 2]
        while last - first > THRESHOLD:
            if depth == 0:
                _heap_sort(key, idx, first, last)
                heap_sorts += 1
                break
            depth -= 1
            mid = first + (last - first) // 2
            _move_median_to_first(key, idx, first, first + 1, mid, last - 1)
            cut = _unguarded_partition(key, idx, first + 1, last, first)
            stack[top, 0], stack[top, 1], stack[top, 2] = cut, last, depth   # "recurse" right
            top += 1
            last = cut                                                       # loop on the left
    return heap_sorts


def _linear_insert(key, idx, i, lo):
    # libstdc++'s insertion is unguarded; `j > lo` never stops it earlier than the guaranteed
    # smaller element would, it only keeps an emulation bug from reading outside the array.
    vkey, vidx = key[i], idx[i]
    j = i
    while j > lo and vkey < key[j - 1]:
        key[j] = key[j - 1]
        idx[j] = idx[j - 1]
        j -= 1
    key[j] = vkey
    idx[j] = vidx


def _insertion_sort(key, idx, first, last):
    for i in range(first + 1, last):
        if key[i] < key[first]:
            # a new minimum goes straight to the front, everything before it moves up one
            vkey, vidx = key[i], idx[i]
            for j in range(i, first, -1):
                key[j] = key[j - 1]
                idx[j] = idx[j - 1]
            key[first] = vkey
            idx[first] = vidx
        else:
            _linear_insert(key, idx, i, first)


def _std_sort(key, idx):
    n = key.size
    if n == 0:
        return 0
    lg = 0
    while (n >> (lg + 1)) > 0:
        lg += 1                                   # std::__lg(n) = floor(log2 n)
    heap_sorts = _introsort_loop(key, idx, 2 * lg)
    if n > THRESHOLD:
        _insertion_sort(key, idx, 0, THRESHOLD)
        for i in range(THRESHOLD, n):
            _linear_insert(key, idx, i, 0)
    else:
        _insertion_sort(key, idx, 0, n)
    return heap_sorts


def _as_keys(keys):
    keys = np.asarray(keys)
    if keys.ndim != 1 or keys.dtype.kind not in "iu":
        raise ValueError(f"keys must be a 1-D integer array, got {keys.dtype} of shape {keys.shape}")
    return np.ascontiguousarray(keys, dtype=np.int64)


def std_sort_argsort(keys, return_heap_sorts=False):
    """Indices `(n,)` int64 in the order libstdc++'s `std::sort` leaves (key, index) pairs.

    keys: 1-D integer array (compared as int64). With `return_heap_sorts`, also the number of
    ranges that exhausted the depth budget and were heap-sorted (0 for most inputs).
    """
    key = _as_keys(keys).copy()
    idx = np.arange(key.size, dtype=np.int64)
    heap_sorts = _std_sort(key, idx)
    return (idx, int(heap_sorts)) if return_heap_sorts else idx


def torch_cpu_argsort(keys):
    """What `torch.argsort(torch.from_numpy(keys))` returns for a 1-D int64 CPU tensor.

    `std::sort` order below `RADIX_MIN` elements, stable order from there on (module docstring).
    """
    key = _as_keys(keys)
    if key.size >= RADIX_MIN:
        return np.argsort(key, kind="stable").astype(np.int64)
    return std_sort_argsort(key)
