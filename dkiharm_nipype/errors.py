"""User-facing errors.

Every problem a user can fix (a malformed dataset, a bad option, a model trained for another
protocol) raises a subclass of :class:`DkiharmInputError` carrying one sentence that names
the offending file or value and says how to fix it. The command line prints that sentence
alone (no traceback) and exits with status 1.
"""

from __future__ import annotations


class DkiharmInputError(ValueError):
    """Bad input that the user can fix; the message is a single line."""


class BIDSInputError(DkiharmInputError):
    """The BIDS dataset or a selection of it cannot be processed."""
