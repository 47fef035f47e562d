"""The one error type of the converters.

Every problem a user can cause while converting (a missing or corrupt raw file, unpaired images and labels, a bad
option, an output folder that must not be written) is raised as :class:`ConversionError` with a one-line message
that names the file or option and the problem; ``nnssl_convert`` and ``nnssl_add_unlabeled`` print it without a
traceback. It is an :class:`nnssl.errors.NnsslError`, so the project's generic user-error handling applies too.
"""

from __future__ import annotations

from nnssl.errors import NnsslError


class ConversionError(NnsslError):
    """Bad raw input or bad options; the message names the file or option and the problem."""
