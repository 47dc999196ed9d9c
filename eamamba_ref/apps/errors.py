"""The commands' user errors, and the one place that turns them into a line and an exit status.

`RestoreError` lives here, not in `restore.py`, because the restore command's steps raise it from
several modules (`pipeline`, `distributed`, `evaluate`); defined in `restore.py` it would make them
import the command they serve. Errors of the lower layers (`io.atomic.OutputRefused`, `ImageError`,
`CheckpointError`, `ConfigError`) are defined there and only listed here, in `user_errors`.
"""
from __future__ import annotations

import functools
import sys

EXIT_BAD_REQUEST = 2        # like argparse: the request cannot be served (nothing was done)
EXIT_INTERRUPTED = 130      # the shell's convention for a command ended by Ctrl-C (128 + SIGINT)


class CommandError(ValueError):
    """A request a command cannot serve (one line for the user): bad option, unusable path..."""


class RestoreError(CommandError):
    """A request the restore command (or its cluster mode) cannot serve."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what was done so far: its message is the line shown to the user."""


def user_errors():
    """The project's error classes whose message is meant for the user as it is."""
    from eamamba_ref.io.atomic import OutputRefused
    from eamamba_ref.io.config import ConfigError
    from eamamba_ref.io.images import ImageError
    from eamamba_ref.io.pth_reader import CheckpointError
    return (CommandError, OutputRefused, ImageError, CheckpointError, ConfigError)


def one_line(err):
    """`err` as one line: an OSError names its file and the system's reason, without '[Errno n]'."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def command(main):
    """Decorate a command's `main(argv=None)`: user errors, OSError (a path the user gave that cannot
    be read or written: missing, read-only, disk full) and Ctrl-C become one line on stderr and an
    exit status (2, 2, 130) instead of a traceback. Anything else is a bug and keeps its traceback."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt as err:
            print(one_line(err) if isinstance(err, Interrupted) else "interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:
            if not isinstance(err, user_errors() + (OSError,)):
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            return EXIT_BAD_REQUEST
    return wrapper
