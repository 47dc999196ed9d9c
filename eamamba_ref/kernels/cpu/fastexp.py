"""Vectorisable float32 exp, softplus and SiLU for the Numba kernels.

Numba on x86 has no SVML here, so ``math.exp`` inside a loop is a scalar libm call (~1.9 ns per
element on 2 threads) and the loop around it cannot be vectorised. The functions below use only
+, *, min/max, comparisons and int<->float bit casts, all of which LLVM turns into SIMD
instructions once they are inlined into a loop.

They are deliberately *not* inlined by Numba (``inline="always"`` would) but left to LLVM's
inliner, which inlines them anyway because they are small. The difference: each function then
keeps its own fast-math flags. The kernels enable 'reassoc' (needed to vectorise the sum over
states); inside exp that flag would let LLVM merge the two halves of ln 2 below into one
constant and lose the extra precision they exist for.

fexp(x) = 2**k * exp(r) with k = round(x / ln 2) and r = x - k ln 2 in [-ln2/2, ln2/2]; ln 2 is
split in two (Cody-Waite) so that r is exact to float32 rounding, and exp(r) is the degree-7
polynomial of the Cephes ``expf``. Measured maximum relative error against float64 exp: 2.8e-7
(about 2 ulp). k and 2**k come from one addition of a magic constant (``_round_and_pow2``): no
round or float->int conversion instructions. The scan's decay factors use the cheaper base-2
variant ``decay_exp2`` instead.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

f32 = np.float32

# Flags for every kernel: allow FMA contraction and cheaper division, but keep IEEE semantics for
# NaN / inf ('nnan' / 'ninf' would let LLVM delete the range checks below).
FASTMATH = {"contract", "arcp", "nsz", "afn"}
# The kernels' loops also allow reassociation, so that LLVM may vectorise sums (see above).
FASTMATH_REASSOC = FASTMATH | {"reassoc"}

LOG2E = f32(1.4426950408889634)
LN2_HI = f32(0.693359375)  # ln 2 split so that k * LN2_HI is exact for |k| < 2**9
LN2_LO = f32(-2.12194440e-4)
EXP_MAX_ARG = f32(88.0)  # exp(88) = 1.65e38 < FLT_MAX: larger arguments saturate there
EXP_MIN_ARG = f32(-87.33)  # below this exp(x) would be denormal: return 0 instead

# The scan keeps its decay factors at or above 2**-63 and flushes states below 2**-63 to zero.
# A product of the two is then 0 or at least 2**-126, the smallest normal float32: the
# recurrence never produces a denormal (on x86 each denormal result or operand costs ~100 cycles).
TINY = f32(2.0**-63)
DECAY_MIN_LOG2 = f32(-63.0)
ROUND_MAGIC = f32(12582912.0)  # 1.5 * 2**23, see _round_and_pow2


@intrinsic
def _int32_bits_as_float32(typingctx, x):
    """Reinterpret the 32 bits of an int32 as a float32 (a free register move, vectorisable)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width != 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _float32_bits_as_int32(typingctx, x):
    """Reinterpret the 32 bits of a float32 as an int32 (the inverse of the above)."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _round_and_pow2(x):
    """(k, 2**k) for k = x rounded to the nearest integer, |x| <= 127.

    Adding ROUND_MAGIC = 1.5 * 2**23 rounds x to an integer (the float32 spacing there is 1) and
    leaves k in the low mantissa bits of the sum, so 2**k is that bit pattern shifted into the
    exponent field (the magic's own bits shift out) plus the bias 127 << 23. Two additions and
    two integer operations instead of round + convert: the decay factor of every state update
    goes through here. The flags exclude 'reassoc', so LLVM cannot fold (x + M) - M to x.
    """
    shifted = x + ROUND_MAGIC
    k = shifted - ROUND_MAGIC
    pow2 = _int32_bits_as_float32((_float32_bits_as_int32(shifted) << np.int32(23)) + np.int32(0x3F800000))
    return k, pow2


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def decay_exp2(y):
    """2**y for float32 y, clamped to [2**-63, 2**127]: the decay factor exp(delta A) of the scan.

    The scan passes y = delta * (A log2 e), with A log2 e computed once per channel: in base 2
    the range reduction r = y - round(y) is exact, which saves the multiply by log2 e and the
    second half of ln 2 that exp needs. 2**r on [-1/2, 1/2] is the degree-6 polynomial of the
    Cephes ``exp2f`` (max relative error 1.0e-7). Below 2**-63 the result stays at 2**-63
    instead of going to 0: the difference is at most 2**-63 of a state, far below float32
    resolution, and it keeps products with states out of the denormal range (see TINY).
    """
    yc = min(max(y, DECAY_MIN_LOG2), f32(127.0))
    k, pow2 = _round_and_pow2(yc)
    r = yc - k
    p = f32(1.535336188319500e-4)
    p = p * r + f32(1.339887440266574e-3)
    p = p * r + f32(9.618437357674640e-3)
    p = p * r + f32(5.550332471162809e-2)
    p = p * r + f32(2.402264791363012e-1)
    p = p * r + f32(6.931472028550421e-1)
    p = p * r + f32(1.0)
    return p * pow2


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def fexp(x):
    """exp(x) for float32 x; 0 where the result would be denormal, saturating at exp(88)."""
    xc = min(max(x, EXP_MIN_ARG), EXP_MAX_ARG)  # keeps k in the range of a float32 exponent
    k, pow2 = _round_and_pow2(xc * LOG2E)
    r = xc - k * LN2_HI
    r = r - k * LN2_LO
    p = f32(1.9875691500e-4)
    p = p * r + f32(1.3981999507e-3)
    p = p * r + f32(8.3334519073e-3)
    p = p * r + f32(4.1665795894e-2)
    p = p * r + f32(1.6666665459e-1)
    p = p * r + f32(5.0000001201e-1)
    p = p * r * r + r + f32(1.0)
    e = p * pow2
    return f32(0.0) if x < EXP_MIN_ARG else e


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def softplus(x):
    """log(1 + exp(x)) for float32 x, written as max(x, 0) + log1p(exp(-|x|)).

    Above 20 this equals x to float32 precision, which is the threshold of the reference CUDA
    kernel. With v = exp(-|x|) in (0, 1], log1p(v) = 2 atanh(s) with s = v / (2 + v) <= 1/3, whose
    odd series converges fast enough that 8 terms reach float32 precision, with no range reduction.
    """
    v = fexp(-abs(x))
    s = v / (f32(2.0) + v)
    s2 = s * s
    q = f32(1.0 / 15.0)
    q = q * s2 + f32(1.0 / 13.0)
    q = q * s2 + f32(1.0 / 11.0)
    q = q * s2 + f32(1.0 / 9.0)
    q = q * s2 + f32(1.0 / 7.0)
    q = q * s2 + f32(1.0 / 5.0)
    q = q * s2 + f32(1.0 / 3.0)
    q = q * s2 + f32(1.0)
    return max(x, f32(0.0)) + f32(2.0) * s * q


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def silu(x):
    """x * sigmoid(x) for float32 x."""
    return x / (f32(1.0) + fexp(-x))
