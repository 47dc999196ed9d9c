"""Writing output files safely: complete or not at all, never over a file unless asked.

Every writer (images, chunked TIFFs, converted checkpoints, oracle traces, evaluation CSVs,
figures) goes through `atomic_output`: the data is written to a hidden temporary file in the
destination folder, which is then moved into place. Without `overwrite` the move is a hard link,
which fails if the destination appeared meanwhile, so a file created by someone else is never
clobbered. The file gets the permissions a plain `open()` would give it (0666 less the umask), not
mkstemp's 0600.
"""
from __future__ import annotations

import contextvars
import errno
import glob
import os
import tempfile
from contextlib import contextmanager


class OutputRefused(ValueError):
    """An output that must not be written (one line for the user): it is an input file, or it
    exists and overwriting was not asked for. Writers with their own error class pass `error=`."""


TEMP_PREFIX = ".eamamba-"
# A batch run tags its temporary files, so that after an interruption (a worker process killed
# mid-write cannot clean up) it can remove exactly its own leftovers and no other run's.
_TAG = contextvars.ContextVar("eamamba_temp_tag", default="")


@contextmanager
def tagged(tag):
    """Temporary files created in this block (this thread) carry `tag` in their names."""
    token = _TAG.set(f"{tag}-" if tag else "")
    try:
        yield
    finally:
        _TAG.reset(token)


def remove_temporaries(folders, tag):
    """Remove the temporary files `tagged(tag)` left in `folders` (after an interrupted run)."""
    for folder in set(folders):
        for path in glob.glob(os.path.join(glob.escape(folder), f"{TEMP_PREFIX}{tag}-*")):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


def _umask():
    """The process's umask. Linux shows it in /proc; elsewhere it can only be read by setting it,
    which briefly gives other threads a umask of 0."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _umask_permissions(path):
    """mkstemp creates 0600 files; give the output the permissions a plain open() would (umask)."""
    os.chmod(path, 0o666 & ~_umask())


def check_destination(path, overwrite=False, inputs=(), error=OutputRefused):
    """Raise if `path` cannot be (or must not be) written; call it before long work.

    `error` (a one-line message) for one of `inputs` (never overwritten, even with `overwrite`) and
    for an existing file without `overwrite`; IsADirectoryError for a folder, FileNotFoundError for
    a missing destination folder (both naming `path`).
    """
    path = os.fspath(path)
    full = os.path.abspath(path)
    if any(full == os.path.abspath(os.fspath(p)) or _same_file(p, path) for p in inputs):
        raise error(f"{path} is an input file; refusing to overwrite it")
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, not an output file", path)
    if os.path.lexists(path) and not overwrite:
        raise error(f"{path} exists; refusing to overwrite it (pass --overwrite)")
    folder = os.path.dirname(full)
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"output folder {folder} does not exist", path)


def _same_file(a, b):
    """True when both exist and are one file (a hard link or a symbolic link to the other)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_writable(folder):
    """Fail early, with one line, if files cannot be created in `folder` (read-only, full...).

    Creates and removes one temporary file: the only reliable test (os.access ignores read-only
    mounts for root, and says nothing about a full disk)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    except OSError as err:
        raise _named(err, folder) from None
    os.close(fd)
    os.remove(tmp)


def _named(err, path):
    """The same OSError, naming the user's path instead of a temporary file (or nothing)."""
    if err.errno is None:
        return err
    return OSError(err.errno, err.strerror or os.strerror(err.errno), os.fspath(path))   # keeps the subclass


@contextmanager
def atomic_output(path, overwrite=False, suffix=None, error=OutputRefused):
    """Yield a temporary path to write `path`'s content to; publish it when the block succeeds.

    `suffix` (default: `path`'s extension) is the temp file's, for writers that pick the format
    from the name. On any error (disk full, read-only folder, an exception in the block) the
    temporary file is removed and nothing appears at `path`; an OSError is re-raised naming `path`.
    An existing `path` is refused (`error`, a one-line message) unless `overwrite`, also if it
    appears while writing.
    """
    path = os.fspath(path)
    check_destination(path, overwrite, error=error)
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + _TAG.get(), suffix=suffix, dir=folder)
    except OSError as err:
        raise _named(err, path) from None
    os.close(fd)
    try:
        _umask_permissions(tmp)
        try:
            yield tmp
            _publish(tmp, path, overwrite)
        except OSError as err:
            if err.errno in (errno.EEXIST,) and not overwrite:
                raise error(f"{path} exists; refusing to overwrite it (pass --overwrite)") from None
            raise _named(err, path) from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _publish(tmp, path, overwrite):
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)             # fails if `path` appeared meanwhile: never clobber
    except FileExistsError:
        raise
    except (OSError, NotImplementedError) as err:      # a file system without hard links: check, then rename
        if isinstance(err, OSError) and err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP,
                                                          errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", path) from None
        os.replace(tmp, path)
