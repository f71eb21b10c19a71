"""Errors caused by the user's input (config, files, data), reported without a traceback.

Every command-line entry point runs under `report_user_errors(prog)`: a ConfigError raised
anywhere below it ends the process with one paragraph on stderr, `<prog>: error: <message>`,
and exit status 2. Code that reads what the user named (a flag's file or directory) turns the
failures of that read into ConfigErrors whose message names the input and the fix; every other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys


class ConfigError(ValueError):
    """Bad configuration or input; the message names the setting or file and the fix."""


class Preempted(Exception):
    """A training loop saved the step it was at and stopped on SIGTERM (a scheduler's
    preemption notice). Raised after the save so that no later stage of a pipeline or study
    runs on an unfinished model; the same command resumes."""


@contextlib.contextmanager
def report_user_errors(prog: str, *also_reported: type[Exception]):
    """`with report_user_errors(prog):` or `@report_user_errors(prog)` on a CLI's main: a
    ConfigError (or one of `also_reported`) becomes `<prog>: error: <message>` on stderr and
    exit status 2. `prog` is what the user typed, as argparse's `prog` (e.g. "python -m
    musicrl_jax.export"), so argparse's usage errors and these read alike."""
    try:
        yield
    except (ConfigError, *also_reported) as err:
        sys.stdout.flush()  # what the command printed before comes first
        # The blank line ends a progress bar or log line left on the terminal.
        print(f"\n{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)


def make_output_dir(path: str, flag: str) -> str:
    """Creates the directory a command writes to (named by `flag`), before the work: a file in
    the way or a place that cannot be written is a ConfigError, not a traceback at the end."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # FileExistsError (a file of that name), NotADirectoryError, ...
        raise ConfigError(f"{flag} {path}: cannot create this directory ({err.strerror}). "
                          "Fix: pass a directory path you can write (not an existing file, "
                          "nor a path inside one).") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: this directory is not writable. Fix: pass one you "
                          "can write, or change its permissions.")
    return path
