"""User errors and the one top-level handler every nnssl console script runs under.

A user error (a bad file, a bad option, a dataset that was never planned) is reported as one line,
``PROG: error: MESSAGE``, with exit status 1 and no traceback: the message names the file or option and the
problem. Anything else is a bug in nnssl or a library and keeps its full traceback. ``NNSSL_DEBUG=1`` shows the
traceback of user errors too.

The project's own error types derive from :class:`NnsslError`. ``InputError`` and ``SplitError`` (in
:mod:`nnssl.split`) also derive from ``ValueError``, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, TypeVar

DEBUG_ENV = "NNSSL_DEBUG"
_F = TypeVar("_F", bound=Callable[..., object])


class NnsslError(Exception):
    """A problem with the user's input, files or environment; the message names the file/option and the problem."""


class InputError(NnsslError, ValueError):
    """Bad input data or a bad option (a corrupt image, an unknown id, a label value outside dataset.json...)."""


class DataFileError(InputError):
    """A file that cannot be decoded completely (truncated gzip stream, corrupt PNG/DICOM, wrong voxel count)."""


class OutputExistsError(NnsslError, FileExistsError):
    """An output that exists and would be replaced; the message says which option allows it."""


def _is_user_error(error: BaseException) -> bool:
    if isinstance(error, NnsslError):
        return True
    # nnU-Net's maybe_convert_to_dataset_name: "Could not find a dataset with the ID 555. ..."
    if isinstance(error, RuntimeError) and str(error).startswith("Could not find a dataset with the ID"):
        return True
    # a read-only or missing output location (names the path), e.g. a read-only $nnUNet_raw
    return isinstance(error, PermissionError)


def _message(error: BaseException) -> str:
    text = " ".join(str(error).split()) if isinstance(error, RuntimeError) else str(error).rstrip()
    if isinstance(error, PermissionError) and error.filename:
        text = f"{error.filename}: permission denied (is the folder read-only?)"
    return text or type(error).__name__


def _never_fail_on_output_encoding() -> None:
    """Under an ASCII locale (``LANG=C`` without Python's UTF-8 mode) printing a table with "×" or "–" would raise
    UnicodeEncodeError after the work is done; write such characters as escapes instead."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")


def report_user_errors(prog: str) -> Callable[[_F], _F]:
    """Decorator for a console script's ``main``: user errors become ``PROG: error: MESSAGE`` and exit 1."""

    def wrap(main: _F) -> _F:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            _never_fail_on_output_encoding()
            try:
                return main(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - re-raised unless it is a user error
                if not _is_user_error(error) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                    raise
                print(f"{prog}: error: {_message(error)}", file=sys.stderr)
                raise SystemExit(1) from None

        return wrapper  # type: ignore[return-value]

    return wrap
