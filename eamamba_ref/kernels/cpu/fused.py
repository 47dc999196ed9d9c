"""The MHSSM as fused, parallel Numba kernels: the 'numba' backend's `mhssm`.

The plain composition (`reference/mhssm.py`, which the 'numpy' backend runs) gathers the K directional sequences
into a `(B, K, C', L)` copy, projects them, scans, and scatters the result back to row-major order:
five passes over memory that only move data. Two observations remove all of them:

* x_proj and dt_proj act on every pixel separately, so they commute with the reordering: they can
  be applied to the row-major map, and the scan kernel reads its inputs *through* the direction's
  index table (step t of head k visits pixel `table[k, t]`) and writes y straight back to that
  pixel. No directional copy exists, and `restore` is free. Where a scan task holds a whole head
  (up to MAX_TASK_CHANNELS channels) it even computes x_proj itself, from the head's channels it
  gathers anyway (`projects_in_scan`): then the x_proj array is never stored either.
* Inside the kernel, data is laid out pixel-major, `(B, L, channels)`: one step of a head reads
  the C' channels of one pixel and its dt/B/C row, a few contiguous cache lines, whatever the scan
  ordering. (Channel-first rows would cost one cache miss per channel per step on a diagonal sweep.)

Kernels (all float32, all parallel over `prange` tasks), and `mhssm` which strings them
together with `gemm.project` for in_proj and out_proj and, for heads wider than
MAX_TASK_CHANNELS, the backend's `matmul` for x_proj:

    dwconv_silu_pixel_major   depthwise k x k conv + bias + SiLU, (B, H, W, d) -> (B, L, d)
    directional_scan          (x_proj +) dt_proj + delta_bias + softplus + scan + D skip,
                              gather/scatter fused
    layer_norm_gate           LayerNorm over channels * SiLU(z), in place on (B, L, d)
                              (`layer_norm_gate_rows` on a block of pixels: out_proj's blocks run it)

A trace records the plain composition's stage names from these functions' boundaries
(`reference.hooks`), without changing what runs: the kernels' inputs and outputs, transposed or put in scan
order, and, recomputed only while recording, the three stages the kernels never store (the conv
before its SiLU, dt_proj, the LayerNorm before its gate).

The recurrence itself is the one of `cpu.py` (SIMD over the state index, vectorisable exp from
`fastexp`, denormal-safe), so the accuracy statement there holds here: agreement with the float32
NumPy reference to ~1e-6 of the output scale (tests/test_fused.py checks 1e-5). Per state update,
at the first U-Net level of the official denoiser (d 64, 256x256, N 16, diagonal x8, one thread) the
kernel takes ~1.3 ns including dt_proj and its gathers (2.1 ns before the gather prefetched the
pixels of the steps ahead, see prefetch.py; 3.7 ns with the gather and scatter loops written
inline in the prange body).
"""
import numpy as np
from numba import njit, prange

from eamamba_ref.reference import scans
from eamamba_ref.reference.layers import conv2d
from eamamba_ref.reference.mhssm import mhssm as reference_mhssm
from eamamba_ref.kernels.cpu import scan as cpu_scan
from eamamba_ref.kernels.cpu.scan import BLOCK, CHUNK, TASKS_PER_THREAD, recurrence
from eamamba_ref.kernels.cpu.fastexp import FASTMATH, FASTMATH_REASSOC, silu, softplus
from eamamba_ref.kernels.cpu.fpenv import flush_denormals, restore_fpenv
from eamamba_ref.kernels.cpu.gemm import pixels_suffice, project, serial_for
from eamamba_ref.kernels.cpu.prefetch import prefetch, prefetch_write
from eamamba_ref.reference.hooks import Part, is_recording, traced

f32 = np.float32
LOG2E = f32(1.4426950408889634)
GATE_ROWS = 64       # pixels per task of the LayerNorm * gate kernel
DWCONV_PIXELS = 32   # pixels per task of the depthwise conv (32 x d floats stay in L1 over its taps)
PREFETCH_STEPS = 32  # how many steps ahead the gather asks for a pixel's rows (16-32 measured best)
# Channels of one head per scan task, at most. Twice `cpu.scan`'s limit: here a step's gather
# (the pixel's dt/B/C row, its prefetches) serves every channel of the task, and at full
# resolution each task reads its head's x_proj rows from main memory, so fewer, larger tasks
# read less. Measured at the shapes of the denoiser at 256x256 (all levels, best of 6): the scans
# took 0.65 s with 16 against 0.81 s with 8 on two threads, 1.25 against 1.47 s on one; 32 and
# 64 were no faster than 16.
MAX_TASK_CHANNELS = 16

__all__ = ["mhssm", "mhssm_core", "fusable", "dwconv_silu_pixel_major", "directional_scan",
           "layer_norm_gate", "layer_norm_gate_rows", "channels_per_task"]


def channels_per_task(batch, heads, channels_per_head, threads=None):
    """Channels of one head per scan task: up to MAX_TASK_CHANNELS, fewer if that leaves threads idle."""
    threads = cpu_scan.num_threads() if threads is None else threads
    wanted = -(-batch * heads * channels_per_head // (TASKS_PER_THREAD * threads))
    return max(1, min(channels_per_head, MAX_TASK_CHANNELS, wanted))


# ------------------------------------------------------------------------------------------------
# Loops written inline in a prange body are not vectorised by LLVM here (measured 3-6x slower);
# the same loops in small functions of their own are. Hence the helpers.
@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _zero_rows(acc):
    """acc = 0 (2-D)."""
    for j in range(acc.shape[0]):
        row = acc[j]
        for c in range(row.size):
            row[c] = f32(0.0)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _tap_rows(acc, w, src):
    """acc[j, c] += w[c] * src[j, c]: one tap of the depthwise conv on a run of pixels, (n, d)."""
    for j in range(acc.shape[0]):
        row = acc[j]
        pixel = src[j]
        for c in range(row.size):
            row[c] += w[c] * pixel[c]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _bias_silu_rows(acc, bias):
    """acc[j, c] = silu(acc[j, c] + bias[c]), in place (2-D)."""
    for j in range(acc.shape[0]):
        row = acc[j]
        for c in range(row.size):
            row[c] = silu(row[c] + bias[c])


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _dwconv_silu_kernel(x, w, bias, out):
    """out[b, i, j, c] = silu(bias[c] + sum_{di, dj} w[di, dj, c] x[b, i+di-p, j+dj-p, c]).

    x, out (B, H, W, d) pixel-major; w (k, k, d), k odd; bias (d,). One task = DWCONV_PIXELS
    pixels of one output row: they are zeroed, then every tap that lands inside the map adds its
    run of input pixels (taps in the order di, dj, as the reference sums them), then bias and
    SiLU. Every loop runs along the channels of a pixel, contiguous in both x and out, and the
    task's pixels stay in L1 across the k*k taps.
    """
    batch, H, W, d = x.shape
    k = w.shape[0]
    pad = (k - 1) // 2
    per_row = (W + DWCONV_PIXELS - 1) // DWCONV_PIXELS
    for task in prange(batch * H * per_row):
        b = task // (H * per_row)
        i = (task // per_row) % H
        p0 = (task % per_row) * DWCONV_PIXELS
        p1 = min(W, p0 + DWCONV_PIXELS)
        acc = out[b, i, p0:p1]                          # the task's output pixels
        _zero_rows(acc)
        for di in range(k):
            src_i = i + di - pad
            if 0 <= src_i < H:                          # rows outside are the zero padding
                for dj in range(k):
                    j0 = max(p0, pad - dj)              # output columns whose input column
                    j1 = min(p1, W + pad - dj)          # j + dj - pad is inside the map
                    if j0 < j1:
                        _tap_rows(acc[j0 - p0:j1 - p0], w[di, dj], x[b, src_i, j0 + dj - pad:j1 + dj - pad])
        _bias_silu_rows(acc, bias)


def _conv_before_silu(a):
    """Trace hook: the depthwise conv alone, `(B, d, H, W)` (the kernel adds the SiLU before
    anything is stored, so the trace recomputes it from the kernel's inputs)."""
    k = a["weight"].shape[-1]
    x = a["x"].transpose(0, 3, 1, 2)
    return {"conv": conv2d(x, a["weight"], a["bias"], padding=(k - 1) // 2, groups=x.shape[1])}


def _channel_first(y):
    """Trace view of a pixel-major `(B, L, d)` result: `(B, d, L)`."""
    return y.transpose(0, 2, 1)


@traced("act", before=_conv_before_silu, view=_channel_first)
def dwconv_silu_pixel_major(x, weight, bias):
    """SiLU(depthwise conv(x)) with 'same' zero padding, on a pixel-major map.

    x: `(B, H, W, d)` float32; weight: `(d, 1, k, k)`, k odd; bias: `(d,)` or None.
    Returns `(B, H*W, d)` float32.
    """
    B, H, W, d = x.shape
    w = np.ascontiguousarray(weight.reshape(d, weight.shape[-2], weight.shape[-1]).transpose(1, 2, 0), dtype=f32)
    b = np.zeros(d, f32) if bias is None else np.ascontiguousarray(bias, dtype=f32)
    out = np.empty((B, H, W, d), dtype=f32)
    _dwconv_silu_kernel(np.ascontiguousarray(x, dtype=f32), w, b, out)
    return out.reshape(B, H * W, d)


# ------------------------------------------------------------------------------------------------
@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _scan_chunk(h, a, dt_in, w, bias, Dv, u, b_chunk, c_chunk, steps, dt, du, y):
    """One chunk of `steps` steps for the task's channels j: delta_j = softplus(w[j] . dt_in + bias[j]),
    the recurrence from state h[j] (updated), y[j, t] = C_t . h_t + D_j u[j, t].

    h, a: (channels, n_blocks, BLOCK), a = A log2(e); dt_in: (R, CHUNK); u, y: (channels, CHUNK);
    b_chunk, c_chunk: (n_blocks, CHUNK, BLOCK); dt, du: (CHUNK,) scratch.
    A function of its own, like the helpers above: the prange body only gathers and scatters.
    """
    for j in range(h.shape[0]):
        for t in range(steps):
            dt[t] = bias[j]
        for r in range(w.shape[1]):
            wr = w[j, r]
            for t in range(steps):
                dt[t] += wr * dt_in[r, t]
        for t in range(steps):
            dt[t] = softplus(dt[t])
        for t in range(steps):
            du[t] = dt[t] * u[j, t]
        y_j = y[j]
        recurrence(h[j], a[j], b_chunk, c_chunk, steps, dt, du, y_j)
        for t in range(steps):
            y_j[t] += Dv[j] * u[j, t]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _gather(xdbl, u, y, table, t0, steps, c0, dt_in, b_chunk, c_chunk, u_chunk, with_rows):
    """The chunk's inputs of one head, in step order: xdbl (L, R + 2N), u and y (L, d) of one
    image, table (L,) of the head; b_chunk, c_chunk (n_blocks, CHUNK, BLOCK); dt_in (R, CHUNK);
    u_chunk (channels, CHUNK) for channels c0... (in a function of its own: ~2x faster than inline).
    Without `with_rows` only u is gathered (the kernel projects it itself; xdbl is not read).

    Every step also prefetches the xdbl, u and y lines of the pixel PREFETCH_STEPS steps ahead
    (see prefetch.py: the pixels of a direction are scattered over the map).
    """
    R = dt_in.shape[0]
    n_state = (xdbl.shape[1] - R) // 2
    n_ch = u_chunk.shape[0]
    ahead = min(steps, table.shape[0] - PREFETCH_STEPS - t0)
    for t in range(steps):
        if t < ahead:
            q = table[t0 + t + PREFETCH_STEPS]
            if with_rows:
                for col in range(0, xdbl.shape[1], 16):          # 16 floats = one 64-byte line
                    prefetch(xdbl, q, col)
                prefetch(xdbl, q, xdbl.shape[1] - 1)
            prefetch(u, q, c0)
            prefetch(u, q, c0 + n_ch - 1)
            prefetch_write(y, q, c0)
            prefetch_write(y, q, c0 + n_ch - 1)
        if with_rows:
            row = xdbl[table[t0 + t]]
            for r in range(R):
                dt_in[r, t] = row[r]
            for n in range(n_state):
                b_chunk[n // BLOCK, t, n % BLOCK] = row[R + n]
                c_chunk[n // BLOCK, t, n % BLOCK] = row[R + n_state + n]
        px = u[table[t0 + t]]
        for j in range(n_ch):
            u_chunk[j, t] = px[c0 + j]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _project_row(out, w, u_chunk, steps):
    """out[t] = sum_c w[c] u_chunk[c, t] for t < steps, summed in the order c = 0, 1, ...:
    one output of x_proj along the chunk's steps (w (C',), u_chunk (C', CHUNK), out (CHUNK,)).
    Four channels per pass over out (one load and store of out per four multiply-adds)."""
    for t in range(steps):
        out[t] = f32(0.0)
    n = w.size
    c = 0
    while c + 4 <= n:
        w0, w1, w2, w3 = w[c], w[c + 1], w[c + 2], w[c + 3]
        u0, u1, u2, u3 = u_chunk[c], u_chunk[c + 1], u_chunk[c + 2], u_chunk[c + 3]
        for t in range(steps):
            acc = out[t]
            acc += w0 * u0[t]
            acc += w1 * u1[t]
            acc += w2 * u2[t]
            acc += w3 * u3[t]
            out[t] = acc
        c += 4
    while c < n:
        wc = w[c]
        uc = u_chunk[c]
        for t in range(steps):
            out[t] += wc * uc[t]
        c += 1


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _project_chunk(w_x, u_chunk, steps, dt_in, bc, b_chunk, c_chunk):
    """x_proj of the chunk's pixels from the head's channels u_chunk (C', CHUNK): its R dt inputs
    into dt_in (R, CHUNK), its B and C rows into bc (2N, CHUNK), then B and C into the recurrence's
    [block, time, lane] order (b_chunk, c_chunk). w_x: (R + 2N, C')."""
    R = dt_in.shape[0]
    n_state = bc.shape[0] // 2
    for r in range(R):
        _project_row(dt_in[r], w_x[r], u_chunk, steps)
    for m in range(2 * n_state):
        _project_row(bc[m], w_x[R + m], u_chunk, steps)
    for n in range(n_state):
        b_lanes = b_chunk[n // BLOCK]
        c_lanes = c_chunk[n // BLOCK]
        lane = n % BLOCK
        b_row = bc[n]
        c_row = bc[n_state + n]
        for t in range(steps):
            b_lanes[t, lane] = b_row[t]
            c_lanes[t, lane] = c_row[t]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _scatter(y_chunk, table, t0, steps, c0, y):
    """y[table[t0 + t], c0 + j] = y_chunk[j, t]: the chunk's outputs back to their pixels."""
    for t in range(steps):
        px = y[table[t0 + t]]
        for j in range(y_chunk.shape[0]):
            px[c0 + j] = y_chunk[j, t]


# ------------------------------------------------------------------------------------------------
@njit(parallel=True, fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _directional_scan_kernel(u, xdbl, w_x, project, table, w_dt, bias, A, Dv, per_task, y):
    """The K directional selective scans of an MHSSM ('concate' merge), fused with their reordering.

    u: (batch, L, d) pixel-major, channel c belongs to head c // C' (C' = d / K);
    xdbl: (batch, K, L, R + 2N), per pixel in row-major order: dt inputs, B, C of each head;
    or, with `project`, not read (shape (batch, K, 1, R + 2N)): each task then holds a whole head
    (per_task is ignored) and computes x_proj of its chunk's pixels from u with w_x (K, R + 2N, C');
    table: (K, L) int64, step t of head k visits pixel table[k, t];
    w_dt: (K, C', R); bias, Dv: (d,); A: (d, N), negative; y: (batch, L, d), written per pixel.

    A task is `per_task` channels of one head of one batch item. Per chunk of CHUNK steps it
    gathers the chunk's B, C (into [block, time, lane] order for the SIMD loop), computes
    delta = softplus(w_dt . dt_in + bias) and delta * u, runs the recurrence channel by channel
    (as cpu.scan_kernel does), and scatters y + D u back to the pixels.
    """
    batch, length, n_channels = u.shape
    K = table.shape[0]
    R = w_dt.shape[2]
    Cp = n_channels // K
    n_state = A.shape[1]
    n_blocks = (n_state + BLOCK - 1) // BLOCK
    if project:                            # x_proj needs all of the head's channels
        per_task = Cp
    per_head = (Cp + per_task - 1) // per_task
    n_tasks = batch * K * per_head

    for task in prange(n_tasks):
        fpenv = flush_denormals()          # denormal states are 0 on this thread (cpu.scan, fpenv)
        b = task // (K * per_head)
        k = (task // per_head) % K
        j0 = (task % per_head) * per_task
        n_ch = min(per_task, Cp - j0)
        c0 = k * Cp + j0

        a_pad = np.zeros((n_ch, n_blocks, BLOCK), dtype=f32)
        h = np.zeros((n_ch, n_blocks, BLOCK), dtype=f32)
        b_chunk = np.zeros((n_blocks, CHUNK, BLOCK), dtype=f32)
        c_chunk = np.zeros((n_blocks, CHUNK, BLOCK), dtype=f32)
        dt_in = np.empty((R, CHUNK), dtype=f32)       # the chunk's dt_proj inputs, [rank, time]
        u_chunk = np.empty((n_ch, CHUNK), dtype=f32)
        y_chunk = np.empty((n_ch, CHUNK), dtype=f32)
        dt = np.empty(CHUNK, dtype=f32)          # delta of one channel over the chunk
        du = np.empty(CHUNK, dtype=f32)          # delta * u
        bc = np.empty((2 * n_state if project else 0, CHUNK), dtype=f32)   # x_proj's B, C rows
        for j in range(n_ch):
            for n in range(n_state):
                a_pad[j, n // BLOCK, n % BLOCK] = A[c0 + j, n] * LOG2E   # exp(x) = 2**(x log2 e)

        for t0 in range(0, length, CHUNK):
            steps = min(CHUNK, length - t0)
            # Gather: one pixel per step, its dt/B/C row and this task's channels of u.
            _gather(xdbl[b, k], u[b], y[b], table[k], t0, steps, c0, dt_in, b_chunk, c_chunk, u_chunk,
                    not project)
            if project:                    # the dt/B/C rows from the head's channels instead
                _project_chunk(w_x[k], u_chunk, steps, dt_in, bc, b_chunk, c_chunk)

            _scan_chunk(h, a_pad, dt_in, w_dt[k, j0:j0 + n_ch], bias[c0:c0 + n_ch], Dv[c0:c0 + n_ch],
                        u_chunk, b_chunk, c_chunk, steps, dt, du, y_chunk)

            # Scatter: straight back to the pixels (this is `restore`).
            _scatter(y_chunk, table[k], t0, steps, c0, y[b])
        restore_fpenv(fpenv)


def _scan_order(per_pixel, table):
    """`(B, L, K, n)` values of every pixel and head -> `(B, K, n, L)`: head k's values in the order
    its scan visits the pixels (step t: pixel table[k, t]), the layout of the plain composition."""
    heads = np.arange(table.shape[0])[:, None]
    return per_pixel[:, table, heads].transpose(0, 1, 3, 2)


def _scan_inputs(a):
    """Trace hook: the scan's inputs in scan order -- `all_around` (B, K, C', L) and `x_proj`
    (B, K, R + 2N, L), exactly the values the kernel gathers -- and `dt_proj` (B, K, C', L), which
    the kernel computes chunk by chunk with its bias and softplus and never keeps: recomputed."""
    u, xdbl, table, w_dt = a["u"], a["xdbl"], a["table"], a["w_dt"]
    B, L, d = u.shape
    K = table.shape[0]
    heads = u.reshape(B, L, K, d // K)
    if xdbl is None:               # projected inside the kernel: the same products, recomputed
        xdbl = np.matmul(heads.transpose(0, 2, 1, 3), a["x_proj_weight"].transpose(0, 2, 1))
    xs = _scan_order(heads, table)
    x_dbl = _scan_order(xdbl.transpose(0, 2, 1, 3), table)
    return {"all_around": xs, "x_proj": x_dbl, "dt_proj": np.matmul(w_dt, x_dbl[:, :, :w_dt.shape[2]])}


def _scan_outputs(a, y):
    """Trace hook: the kernel's outputs in scan order, `selective_scan` (B, K*C', L)."""
    B, L, d = y.shape
    K = a["table"].shape[0]
    return {"selective_scan": _scan_order(y.reshape(B, L, K, d // K), a["table"]).reshape(B, d, L)}


@traced("restore", before=_scan_inputs, after=_scan_outputs, view=_channel_first)
def directional_scan(u, xdbl, table, w_dt, bias, A, D, x_proj_weight=None):
    """K directional selective scans ('concate' heads), read and written in row-major pixel order.

    u: `(B, L, d)` pixel-major SSM input (after conv and SiLU), head k owns channels
    `k*C' .. (k+1)*C' - 1`; xdbl: `(B, K, L, R + 2N)` = x_proj of every pixel, per head
    (dt inputs, then B, then C), or None: then x_proj_weight `(K, R + 2N, C')` is applied inside
    the kernel, one task per head (see `projects_in_scan`); table: `(K, L)` gather table of the
    directions (`scans.direction_indices`); w_dt: `(K, C', R)`; bias, D: `(d,)`; A: `(d, N)`.
    Returns y `(B, L, d)`: per pixel, the scan outputs (with D u) of the head that owns the channel,
    i.e. `restore(selective_scan(all_around(...)))` with delta = softplus(dt_proj + bias).
    """
    B, L, d = u.shape
    K = table.shape[0]
    y = np.empty((B, L, d), dtype=f32)
    project = xdbl is None
    if project:
        w_x = np.ascontiguousarray(x_proj_weight, f32)
        xdbl = np.empty((B, K, 1, w_x.shape[1]), f32)     # not read; its last axis is R + 2N
    else:
        w_x = np.empty((K, 1, 1), f32)
    _directional_scan_kernel(u, xdbl, w_x, project, np.ascontiguousarray(table),
                             np.ascontiguousarray(w_dt, f32), np.ascontiguousarray(bias, f32),
                             np.ascontiguousarray(A, f32), np.ascontiguousarray(D, f32),
                             channels_per_task(B, K, d // K), y)
    return y


def projects_in_scan(channels_per_head):
    """Whether the fused MHSSM leaves x_proj to the scan kernel: when one task can hold a whole
    head (up to MAX_TASK_CHANNELS channels), it projects the head's pixels chunk by chunk from
    the channels it gathers anyway, and the `(B, K, L, R + 2N)` x_proj array is never stored.
    Wider heads would need every task of a head to project all of it: BLAS does x_proj then."""
    return channels_per_head <= MAX_TASK_CHANNELS


# ------------------------------------------------------------------------------------------------
@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _layer_norm_gate_row(v, g, weight, bias, eps, has_z):
    """v = LayerNorm(v) * silu(g) (or without the gate) over one pixel's channels, in place."""
    d = v.size
    mean = f32(0.0)
    for c in range(d):
        mean += v[c]
    mean /= d
    var = f32(0.0)
    for c in range(d):
        e = v[c] - mean
        var += e * e
    rstd = f32(1.0) / np.sqrt(var / d + eps)
    if has_z:
        for c in range(d):
            v[c] = ((v[c] - mean) * rstd * weight[c] + bias[c]) * silu(g[c])
    else:
        for c in range(d):
            v[c] = (v[c] - mean) * rstd * weight[c] + bias[c]


@njit(fastmath=FASTMATH_REASSOC, error_model="numpy", nogil=True, cache=True)
def layer_norm_gate_rows(y, z, l0, l1, weight, bias, eps, has_z):
    """In place: y[l] = LayerNorm(y[l]) * silu(z[l]) for the pixels l0..l1 of one image, y and z
    `(L, d)` (z ignored without the gate). Releases the GIL: out_proj's blocks run it on the
    runtime's pool right before their GEMM (`_gate_and_project_out`)."""
    for l in range(l0, l1):
        _layer_norm_gate_row(y[l], z[l] if has_z else z[0], weight, bias, eps, has_z)


@njit(parallel=True, fastmath=FASTMATH_REASSOC, error_model="numpy", cache=True)
def _layer_norm_gate_kernel(y, z, weight, bias, eps, has_z):
    """In place: y[b, l] = LayerNorm(y[b, l]) * silu(z[b, l]) over the last axis (two-pass
    variance), in tasks of GATE_ROWS pixels of one image."""
    batch, length, d = y.shape
    per_image = (length + GATE_ROWS - 1) // GATE_ROWS
    for task in prange(batch * per_image):
        b = task // per_image
        l0 = (task % per_image) * GATE_ROWS
        layer_norm_gate_rows(y[b], z[b] if has_z else z[0], l0, min(length, l0 + GATE_ROWS), weight, bias,
                             eps, has_z)


def _run_layer_norm_gate(y, z, weight, bias, eps):
    zz = np.zeros((1, 1, 1), f32) if z is None else z
    _layer_norm_gate_kernel(y, zz, np.ascontiguousarray(weight, f32), np.ascontiguousarray(bias, f32),
                            f32(eps), z is not None)
    return y


def _norm_before_gate(a):
    """Trace hook: the LayerNorm alone, `out_norm` (B, d, L), when the kernel fuses it with the gate
    (recomputed by the same kernel without the gate, on a copy: y is overwritten by the call)."""
    if a["z"] is None:
        return {}
    y = _run_layer_norm_gate(a["y"].copy(), None, a["weight"], a["bias"], a["eps"])
    return {"out_norm": _channel_first(y)}


@traced(lambda a: "out_norm" if a["z"] is None else "gate", before=_norm_before_gate, view=_channel_first)
def layer_norm_gate(y, z, weight, bias, eps=1e-5):
    """`LayerNorm(y) * silu(z)` over the channels of pixel-major `y (B, L, d)`, computed in place.

    z: `(B, L, d)` or None (no gate); weight, bias: `(d,)`. Returns y.
    """
    return _run_layer_norm_gate(y, z, weight, bias, eps)


# ------------------------------------------------------------------------------------------------
def fusable(cfg):
    """Whether `mhssm` fuses this configuration: the 2-D conv, and heads owning separate channels
    ('concate' merge, or one direction)."""
    return cfg.conv_2d and (cfg.scan_merge_method == "concate" or cfg.scan_count == 1)


def mhssm(p, x, size, cfg, ops, *, parallel_for=serial_for):
    """`reference.mhssm.mhssm` (same arguments and result, to float32 rounding): fused kernels for
    the configurations `fusable` accepts, the reference composition (on `ops`) for the others.
    x: `(B, C, L)` of an (H, W) map -> `(B, C, L)`. parallel_for: the pool of the projections."""
    if not fusable(cfg):
        return reference_mhssm(p, x, size, cfg, ops)
    return fused_mhssm(p, x, size, cfg, ops, parallel_for)


@traced("mamba", scope="mamba")
def fused_mhssm(p, x, size, cfg, ops, parallel_for=serial_for):
    """The MHSSM computed with the kernels above (`fusable` configurations only); see `mhssm_core`."""
    return mhssm_core(p, x, size, cfg, ops, parallel_for)


def mhssm_core(p, x, size, cfg, ops, parallel_for=serial_for, norm=None, residual=False):
    """The fused MHSSM, optionally with the block's LayerNorm before it and its residual after it:
    `x + MHSSM(LN(x))` (the projections then normalise and add per block of pixels,
    `gemm.project`, and neither the normalised map nor the MHSSM's output is ever stored).

    Steps 1-6 of the plain composition run pixel-major `(B, L, d)`: in_proj writes the SSM input
    pixel-major (`x^T W_x^T`), the depthwise conv reads and writes it so, x_proj runs on the
    row-major map (it commutes with the reordering; inside the scan kernel for narrow heads), one
    kernel does dt_proj, softplus, the K directional scans and the D skip while reading and writing
    through the directions' index tables, and LayerNorm * SiLU(z) is done by out_proj's blocks
    right before their GEMM. No `(B, K, C', L)` copy is made. x: `(B, C, L)` of an (H, W) map ->
    `(B, C, L)`;
    norm: None or (weight, bias or None, eps); residual: whether x is added to the output.
    """
    B, C, L = x.shape
    d = cfg.d_inner(C)
    K, Cp = cfg.heads(C)
    w_in = p["in_proj.weight"]
    b_in = p.get("in_proj.bias")

    # 1. in_proj, first half: the SSM input, pixel-major (the gate z comes after the scan)
    xs = _project_x(w_in, b_in, x, d, norm, parallel_for)                   # (B, L, d)

    # 2. depthwise conv + SiLU, pixel-major in and out
    u = dwconv_silu_pixel_major(xs.reshape(B, *size, d), p["conv.weight"], p.get("conv.bias"))
    del xs

    # 3-5. x_proj of every pixel, per head (inside the scan kernel for narrow heads); then the
    #      fused directional scans
    w_x = p["x_proj_weight"]                                             # (K, R + 2N, C')
    xdbl = None
    if not projects_in_scan(Cp):
        heads = u.reshape(B, L, K, Cp).transpose(0, 2, 1, 3)             # (B, K, L, C') view
        xdbl = ops.matmul(heads, w_x.transpose(0, 2, 1), "rows")         # (B, K, L, R + 2N)
    table = scans.direction_indices(cfg.scan_type, cfg.scan_count, size)
    y = directional_scan(u, xdbl, table, p["dt_projs_weight"], p["dt_projs_bias"].reshape(-1),
                         -np.exp(p["A_logs"]), p["Ds"], x_proj_weight=w_x)   # (B, L, d)
    del u, xdbl

    # 6. in_proj, second half: the gate z straight to pixel-major (x^T W_z^T), made only now so
    #    that it and xdbl (the largest array here) never coexist: peak memory at 512x512
    z = None if cfg.disable_z_branch else _project_z(w_in, b_in, x, d, norm, parallel_for)  # (B, L, d)

    # 7. LayerNorm * SiLU(z) in place, then out_proj back to channel-first (W_out y^T)
    return _gate_and_project_out(p, y, z, x if residual else None, parallel_for)     # (B, C, L)


def _gate_and_project_out(p, y, z, residual, parallel_for):
    """`layer_norm_gate` then `_project_out` (+ residual): y `(B, L, d)`, z `(B, L, d)` or None ->
    `(B, C, L)`. Each block of out_proj normalises and gates its own pixels right before its GEMM,
    while they are in cache: one pass over y and z fewer, the same bits (the same row function).
    While a trace records, and on maps too small to give every thread a block (a choice made
    from the shapes alone), the two steps run one after the other."""
    weight, bias = p["out_norm.weight"], p["out_norm.bias"]
    B, L, d = y.shape
    if is_recording() or not pixels_suffice(L):
        y = layer_norm_gate(y, z, weight, bias, eps=1e-5)
        return _project_out(p, y, residual, parallel_for)
    weight, bias = np.ascontiguousarray(weight, f32), np.ascontiguousarray(bias, f32)
    zz = np.zeros((B, 1, 1), f32) if z is None else z

    def gate(b, l0, l1):
        layer_norm_gate_rows(y[b], zz[b], l0, l1, weight, bias, f32(1e-5), z is not None)
    return _project_out(p, y, residual, parallel_for, prepare=gate)


def _in_proj_part(xs, where, a):
    """Trace: a part `(B, d, L)` of `in_proj` (B, 2d, L), which the fused MHSSM computes in halves."""
    return {"in_proj": Part(xs, (slice(None), where), (xs.shape[0], a["w_in"].shape[0], xs.shape[2]))}


@traced(after=lambda a, xs: _in_proj_part(_channel_first(xs), slice(0, a["d"]), a))
def _project_x(w_in, b_in, x, d, norm, parallel_for):
    """in_proj's first d outputs (the SSM input) on `x (B, C, L)` (or on LN(x)), pixel-major:
    `(B, L, d)` (measured faster than channel-first for these shapes, and the conv reads it so)."""
    return project(w_in[:d], x, norm=norm, bias=None if b_in is None else b_in[:d],
                   pixel_major_out=True, parallel_for=parallel_for)


@traced(after=lambda a, z: _in_proj_part(_channel_first(z), slice(a["d"], None), a))
def _project_z(w_in, b_in, x, d, norm, parallel_for):
    """in_proj's last d outputs (the gate z) on `x (B, C, L)` (or on LN(x)), pixel-major: `(B, L, d)`."""
    return project(w_in[d:], x, norm=norm, bias=None if b_in is None else b_in[d:],
                   pixel_major_out=True, parallel_for=parallel_for)


@traced("out_proj")
def _project_out(p, y, residual, parallel_for, prepare=None):
    """out_proj on pixel-major `y (B, L, d)` -> channel-first `(B, C, L)` (W_out y^T), plus
    `residual (B, C, L)` if given; prepare: see `gemm.project`."""
    return project(p["out_proj.weight"], y, bias=p.get("out_proj.bias"), residual=residual,
                   pixel_major_in=True, prepare=prepare, parallel_for=parallel_for)
