"""Software prefetch for the Numba kernels: `prefetch(a, i, j)` / `prefetch_write(a, i, j)`.

The fused directional scan reads its inputs one pixel per step in the order of a scan direction
(diagonal, zigzag, Hilbert, column-wise...). Consecutive pixels are up to a whole image row
apart, which the hardware prefetchers do not follow (they track sequential streams within a
page), so without help every step waits for a few cache misses: measured at level 1 of the
denoiser (64 channels, 256 x 256, diagonal, one thread) the gather took ~1.1 ns per state update,
more than half of the kernel, against ~0.5 ns in raster order. The table of the direction says
which pixels come next, so the kernel asks for them a few dozen steps early.

Both functions compile to LLVM's `llvm.prefetch` (PREFETCHT0 / PREFETCHW on x86; a no-op on
targets without one). They never fault and change no values: only timing depends on them.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["prefetch", "prefetch_write"]


def _make_prefetch(rw):
    @intrinsic
    def _prefetch(typingctx, arr, i, j):
        if not (isinstance(arr, types.Array) and arr.ndim == 2
                and isinstance(i, types.Integer) and isinstance(j, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            inds = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:])]
            ptr = cgutils.get_item_pointer2(
                context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
                strides=cgutils.unpack_tuple(builder, ary.strides), layout=signature.args[0].layout,
                inds=inds, wraparound=False, boundscheck=False)
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            # declare_intrinsic mangles the name for the pointer type of this llvmlite's LLVM
            fn = builder.module.declare_intrinsic(
                "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
            # (address, read 0 / write 1, locality 3 = keep in all cache levels, data cache)
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(rw), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.void(arr, i, j), codegen

    return _prefetch


prefetch = _make_prefetch(0)
prefetch.__doc__ = "prefetch(a, i, j): load the cache line of a[i, j] (a 2-D array) ahead of a read."
prefetch_write = _make_prefetch(1)
prefetch_write.__doc__ = "prefetch_write(a, i, j): load the cache line of a[i, j] ahead of a write."
