"""Who runs the CPU threads of a forward pass, and how many: the one place that owns parallelism.

Importing eamamba_ref changes nothing in the process (no environment variable, no library
setting). Everything happens here, at run time, and only while a forward pass runs
(`forward_threads()`), so that the result is **bit for bit the same for any number of threads**
and whatever the user imported first (NumPy, torch):

* **BLAS is held to one thread** inside `forward_threads()` (threadpoolctl, which reaches the
  library NumPy loaded whenever it was loaded) and given back its previous setting on exit.
  A multi-threaded BLAS GEMM may cut its work differently for each thread count (measured: the
  demo denoiser at 96x128 differed in 30,199 output elements, up to 6.6e-7, between
  OPENBLAS_NUM_THREADS=1 and 2), and its idle threads spin for a while after every call, on the
  cores the Numba kernels need next.
* **GEMMs run on this module's pool** instead: `kernels.cpu.gemm` cuts every product into blocks of
  a fixed number of output pixels (a function of the shapes only, never of the thread count),
  and the pool's threads run the blocks, each a one-thread BLAS call. A block's bits depend on
  its inputs alone, so any number of threads gives the same result. Its threads wait on a
  condition variable when idle: they never spin.
* **Numba's kernels** split their work by shapes, not by thread counts, or where a task size
  does follow the thread count (the scans' channels per task) every channel is computed by the
  same instructions whichever task holds it (tests/test_threads.py checks both).
  Their threading layer is chosen here before the first kernel runs (`start_numba_threads`),
  unless the user picked a layer or Numba's threads already run: the first of
  PREFERRED_THREADING_LAYERS that loads. 'tbb' (Intel oneTBB, the `tbb` package) first: its
  calling thread takes part in every kernel and its idle workers wait a few microseconds before
  they sleep, so the ~460 kernels of a forward pass do not each pay a wake-up of sleeping threads
  (measured on 2 cores: the whole model 15-20 % faster at 64x64 and 10-20 % at 128x128 than with
  'workqueue'). Then Numba's own 'workqueue', whose threads sleep on a condition variable between
  kernels. Both behave the same whatever was imported first, and both survive a `fork`.
  'omp' is never chosen: GNU OpenMP hangs a forked child of a process that used it (a
  multiprocessing 'fork' after a forward), and it is the library torch loads, with a spinning
  idle policy that slowed this pool's GEMMs 1.6x after `import torch`. Forward passes in one
  process take turns (`forward_threads` holds a lock; 'workqueue' must not be entered by two
  threads at once); each uses every thread anyway.

Thread count: Numba's (`numba.get_num_threads()`: NUMBA_NUM_THREADS, or `numba.set_num_threads`
in the calling thread), for the kernels and for the GEMM pool alike.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["forward_threads", "num_threads", "parallel_for", "start_numba_threads",
           "PREFERRED_THREADING_LAYERS"]

# The Numba threading layers tried, in order, when nobody else chose one (see the module docstring).
PREFERRED_THREADING_LAYERS = ("tbb", "workqueue")

_lock = threading.RLock()       # one forward at a time; re-entrant for nested forwards (tiling)
_depth = 0
_blas_limit = None               # threadpoolctl's limiter while a forward runs
_controller = None               # threadpoolctl's view of the loaded libraries (built once)
_pool = None
_pool_size = 0
_pool_lock = threading.Lock()
_numba_started = False
_POOL_PREFIX = "eamamba-gemm"


def _after_fork_in_child():
    """A forked child has none of the parent's pool threads, and a lock may have been held by a
    thread that is not there: start afresh (the pool is made again on first use)."""
    global _lock, _pool_lock, _pool, _pool_size, _depth, _blas_limit
    _lock, _pool_lock = threading.RLock(), threading.Lock()
    _pool, _pool_size, _depth, _blas_limit = None, 0, 0, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def start_numba_threads():
    """Start Numba's threads with the layer of this module's choice, once; returns the layer's name.

    The choice is left alone where someone made it: NUMBA_THREADING_LAYER in the environment,
    `numba.config.THREADING_LAYER` set by the program, or Numba's threads already running (a
    parallel kernel ran before). Numba's config is restored after the start, so only the
    running layer tells that this happened.
    """
    global _numba_started
    import numba
    if not _numba_started:
        with _pool_lock:
            if not _numba_started:
                try:
                    numba.threading_layer()          # raises ValueError while nothing runs yet
                    chosen = True
                except ValueError:
                    chosen = bool(os.environ.get("NUMBA_THREADING_LAYER")) or \
                        str(numba.config.THREADING_LAYER).lower() != "default"
                if chosen:
                    numba.get_num_threads()          # starts the layer somebody chose (if not yet)
                else:
                    _start_preferred_layer(numba)
                _numba_started = True
    return numba.threading_layer()


def _start_preferred_layer(numba):
    """Start the first of PREFERRED_THREADING_LAYERS that loads ('tbb' needs the tbb package)."""
    previous = numba.config.THREADING_LAYER
    try:
        for layer in PREFERRED_THREADING_LAYERS:
            numba.config.THREADING_LAYER = layer
            try:
                numba.get_num_threads()          # starts the threads (Numba reads the config now)
                return
            except ValueError:                   # not loadable here: Numba started nothing, try the next
                if layer == PREFERRED_THREADING_LAYERS[-1]:
                    raise
    finally:
        numba.config.THREADING_LAYER = previous


def num_threads():
    """The threads a forward pass uses: Numba's count for the calling thread."""
    import numba
    start_numba_threads()
    return numba.get_num_threads()


def _blas_controller():
    """threadpoolctl's controller, built once. threadpoolctl's import sets KMP_DUPLICATE_LIB_OK in
    os.environ (for Intel OpenMP, should one load later); a variable the program did not have is
    taken out again, so that running the model leaves the environment as it was."""
    global _controller
    if _controller is None:
        had = "KMP_DUPLICATE_LIB_OK" in os.environ
        from threadpoolctl import ThreadpoolController
        if not had:
            os.environ.pop("KMP_DUPLICATE_LIB_OK", None)
        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def forward_threads():
    """Inside: BLAS on one thread, Numba's threads started, no other forward pass running.

    Re-entrant (a forward that runs forwards, e.g. over tiles, holds it once more). On the last
    exit BLAS gets back the thread count it had.
    """
    global _depth, _blas_limit
    with _lock:
        if _depth == 0:
            start_numba_threads()
            _blas_limit = _blas_controller().limit(limits=1, user_api="blas")
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                limiter, _blas_limit = _blas_limit, None
                limiter.restore_original_limits()


def _executor(threads):
    """The GEMM pool, `threads` workers (re-made if the count changed)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=_POOL_PREFIX)
            _pool_size = threads
        return _pool


def parallel_for(fn, n_tasks):
    """fn(0), ..., fn(n_tasks - 1) on the pool and the calling thread (inline when there is one
    task or one thread), inside `forward_threads()` so that each runs BLAS on one thread. The tasks
    must write to disjoint outputs; which thread runs which task does not matter to the result.
    Each thread takes the next task until none is left (a shared iterator: `next` on it is atomic
    under the GIL), so a call costs one hand-off per thread, not one per task. Returns None; an
    exception of a task is raised here."""
    if threading.current_thread().name.startswith(_POOL_PREFIX):
        for i in range(n_tasks):          # a task of the pool itself: inline, never wait on the pool
            fn(i)
        return
    with forward_threads():
        threads = min(num_threads(), n_tasks)
        if threads <= 1:
            for i in range(n_tasks):
                fn(i)
            return
        tasks = iter(range(n_tasks))

        def worker():
            for i in tasks:
                fn(i)
        helpers = [_executor(num_threads()).submit(worker) for _ in range(threads - 1)]
        try:
            worker()
        finally:
            for future in helpers:
                future.result()
