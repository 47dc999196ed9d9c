"""The Dask cluster the restore command's cluster mode runs on, and what each worker keeps.

`connect` starts a LocalCluster of worker processes (or reaches a running scheduler) and closes it
again, Ctrl-C included; `worker_models` is the per-process cache of loaded weights that the tasks
of `distributed.py` share. Dask is optional: `require_dask` turns its absence into one line naming
the extra that installs it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from contextlib import contextmanager

from eamamba_ref.apps.errors import RestoreError, one_line
from eamamba_ref.apps.pipeline import TaskModels
from eamamba_ref.apps.tasks import TASKS

CONNECT_TIMEOUT = 5         # seconds to reach a running scheduler (distributed's default, 30 s, is long for a typo)
DASK_EXTRA = 'pip install "eamamba_ref[dask]"'


def require_dask():
    """The `distributed` package, or a one-line `RestoreError` naming the extra that installs it."""
    try:
        import dask  # noqa: F401
        import distributed
    except ImportError as err:
        raise RestoreError(f"folders, globs, --scheduler, --workers and --chunk run on Dask, which is not "
                           f"installed (no module {err.name or 'distributed'!r}): {DASK_EXTRA}") from None
    return distributed


@contextmanager
def connect(scheduler=None, workers=None):
    """A `distributed.Client`, closed (with its cluster) on exit.

    scheduler: None or 'local' starts a LocalCluster of `workers` processes (default: one per CPU
    core), one thread each, with the Numba threads split between them so that the workers do not
    oversubscribe the cores; anything else is the address of a running scheduler
    ('tcp://host:8786'), whose workers are used as they are; one that cannot be reached within
    `CONNECT_TIMEOUT` seconds is a `RestoreError`.
    """
    dd = require_dask()
    if scheduler in (None, "local"):
        cores = os.cpu_count() or 1
        n = cores if workers is None else workers
        if n < 1:
            raise RestoreError(f"--workers must be >= 1, got {n}")
        env = {"NUMBA_NUM_THREADS": str(max(1, cores // n))}
        cluster = client = None
        try:
            with warnings.catch_warnings(), _ctrl_c_for_this_process_only():
                # another cluster holds the default HTTP port: any port will do
                warnings.filterwarnings("ignore", message="Port .* is already in use")
                # silence_logs: the workers' and nannies' WARNINGs are shutdown noise here (a task
                # cancelled by Ctrl-C, a slow worker killed at the end); errors are still shown
                cluster = dd.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                          dashboard_address=None, env=env, silence_logs=logging.ERROR)
            client = dd.Client(cluster)
            yield client
        finally:
            _close(client, cluster)
    else:
        if workers is not None:
            raise RestoreError("--workers sizes a local cluster; a running scheduler brings its own workers")
        try:
            client = dd.Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, ValueError, TypeError) as err:      # refused, timed out, not an address
            raise RestoreError(f"cannot connect to the Dask scheduler at {scheduler} ({one_line(err)}); is "
                               f"`dask scheduler` running there? (--scheduler local starts a local cluster)") from None
        try:
            yield client
        finally:
            client.close()


@contextmanager
def _ctrl_c_for_this_process_only():
    """Start worker processes that ignore Ctrl-C (SIGINT); this process keeps it.

    The terminal sends Ctrl-C to the whole process group, workers included; a worker interrupted
    while it imports or runs prints its own traceback and leaves the cluster half-dead. An ignored
    signal stays ignored across exec (and Python then installs no KeyboardInterrupt handler), so
    SIGINT is ignored while the workers are spawned, then this process's handler is put back: it
    alone turns Ctrl-C into KeyboardInterrupt and closes the cluster, whose nannies end the workers.
    The price: a Ctrl-C during the cluster's start-up (seconds) is not seen; press it again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield                               # signal handlers can only be changed from the main thread
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if old is None else old)


def _close(client, cluster):
    """Close the client, then the cluster and its workers (either may be None: start-up failed).

    A worker that is slow to exit (a busy machine) is killed by its nanny, which distributed logs
    as a WARNING although every result is already written: `silence_logs=logging.ERROR` above
    keeps that quiet until the cluster is closed."""
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


_MODELS = {}
_MODELS_LOCK = threading.Lock()


def worker_models(task_name, weights, backend):
    """The task's models (`pipeline.TaskModels`), each loaded at most once per worker process
    (threads share them).

    Keyed by the weights file's path, size and modification time, so a replaced file is reloaded.
    """
    task = TASKS[task_name]
    path = os.path.abspath(weights) if weights else task.bundled_path()
    stat = os.stat(path) if path and os.path.exists(path) else None
    key = (task_name, path, stat and (stat.st_size, stat.st_mtime_ns), backend)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = TaskModels(task, weights, backend)
        return _MODELS[key]
