"""allocator.reuse_freed_memory: inside it glibc keeps a freed large block for reuse, outside it
does not (the block is unmapped / trimmed), and nesting restores the defaults only at the end.

Observed through glibc's own accounting (`mallinfo2().fordblks`: free bytes held by malloc), so the
test needs glibc >= 2.33; elsewhere the context manager is a documented no-op.
"""
import ctypes

import numpy as np
import pytest

from eamamba_ref.runtime import allocator


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _free_bytes_held():
    libc = allocator._libc
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().fordblks


def _allocate_and_free(mib=64):
    a = np.ones(mib << 18, np.float32)         # mib MiB, touched
    del a


def test_freed_large_blocks_are_kept_inside_and_given_back_outside():
    def run():
        before = _free_bytes_held()
        _allocate_and_free()
        outside = _free_bytes_held() - before
        with allocator.reuse_freed_memory():
            _allocate_and_free()
            inside = _free_bytes_held() - before
        after = _free_bytes_held() - before
        return outside, inside, after

    outside, inside, after = run()
    assert outside < 16 << 20          # unmapped at once by default
    assert inside >= 60 << 20          # kept for the next array
    assert after < 16 << 20            # malloc_trim on exit


def test_nesting_changes_settings_on_first_entry_and_last_exit():
    assert not allocator.active()
    with allocator.reuse_freed_memory():
        with allocator.reuse_freed_memory():
            assert allocator.active()
        assert allocator.active()
        _free_bytes_held()            # (skips where mallinfo2 is missing, like the test above)
        _allocate_and_free()
        assert _free_bytes_held() >= 60 << 20   # still inside: the inner exit changed nothing
    assert not allocator.active()
