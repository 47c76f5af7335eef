"""User-facing errors.

Anything a person can cause (a bad config, a missing file, mismatched shards or checkpoints) raises
:class:`UserError`. The CLI prints its one-line message and exits with code 2; nothing else is printed.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input. ``str(err)`` is the whole message shown to them."""

    exit_code = 2
