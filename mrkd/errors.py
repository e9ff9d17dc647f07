"""The one error base class (``MrkdError``) and the one CLI error boundary every ``mrkd`` command uses.

Every error mrkd raises for a user's mistake or a bad input (a missing file, a malformed sidecar,
an option out of range, a missing optional package) derives from MrkdError and carries a message that
names the file or field; each module adds its own subclass (SourceError, MetadataError, LineError, ...),
and SettingError is the one for a bad option or config field. ``error_boundary`` turns those, and the
operating system's refusals (permission denied, a folder where a file should be), into one line on
stderr and exit status 1; it is the only place that does: commands do not convert errors themselves.
Anything else (a ValueError from a shape check deep in the library) is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools


class MrkdError(Exception):
    """Base of mrkd's expected errors; the CLIs print the message as one line."""


class SettingError(MrkdError, ValueError):
    """A setting the user gave (a command option, a config field, an entry of a settings file) is unknown,
    out of range or contradicts another; the message names the setting. A ValueError too, so code that
    checks settings with ``except ValueError`` keeps working."""


class DeviceError(MrkdError, ValueError):
    """A compute device was asked for that this machine does not have."""


def one_line(message: object) -> str:
    """The message on one line (continuation lines joined with ' | ')."""
    return " | ".join(part.strip() for part in str(message).splitlines() if part.strip()) or repr(message)


WARNING_PREFIX = "warning: "


def warning_line(message: object) -> str:
    """A warning for the person at the terminal, as every mrkd command writes one: ``warning: <message on one
    line>`` (Python warnings under error_boundary too). Each command writes it its own way (stderr, above
    progress bars, a callback); this is the one place its words begin."""
    return WARNING_PREFIX + one_line(message)


# Exit statuses: 2 for a setting the user gave wrongly (click's own status for a usage mistake), 1 for
# every other expected error (a file, a device, data that cannot be used).
USAGE_EXIT, ERROR_EXIT = 2, 1


def _stdout_closed() -> bool:
    """Whether standard output's reader has gone; if so, stdout is pointed at /dev/null, so the
    interpreter's last flush does not print a second error."""
    import os
    import select
    import sys
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poller.poll(0))   # a pipe whose reader closed
    except (OSError, ValueError, AttributeError):
        return False
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    return gone


def error_boundary(command):
    """Decorate a click command callback: MrkdError and OSError become ``Error: <one line>`` with exit
    status 1 (SettingError: 2, as click's usage errors); warnings are written above progress bars."""
    if getattr(command, "_mrkd_error_boundary", False):
        return command

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import click
        import warnings

        from mrkd.console import warnings_above_bars
        shown = warnings.formatwarning
        warnings.formatwarning = _one_line_warning
        try:
            with warnings_above_bars():     # not after a live progress bar on its line
                return command(*args, **kwargs)
        except BrokenPipeError as exc:
            if _stdout_closed():        # `mrkd review EV | head`: the reader has what it wanted
                raise SystemExit(141) from None      # 128 + SIGPIPE, as a shell tool ends
            raise click.ClickException(one_line(exc)) from exc
        except (MrkdError, OSError) as exc:
            error = click.ClickException(one_line(exc))
            error.exit_code = USAGE_EXIT if isinstance(exc, SettingError) else ERROR_EXIT
            raise error from exc
        finally:
            warnings.formatwarning = shown

    wrapper._mrkd_error_boundary = True
    return wrapper


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning for the person at the terminal: what it says, on one line (a file name with a newline
    stays on it), without Python's source file, line number and code line."""
    return warning_line(message) + "\n"
