"""Errors a user can cause or fix. The CLI turns them into one line and an exit code.

Anything raised as a :class:`UserError` must say what to do about it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is the one line printed."""

    exit_code = 2


class NotRootError(UserError):
    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} needs root (CAP_NET_ADMIN/CAP_SYS_ADMIN): run it with sudo or as root"
        )


class SourceError(UserError):
    """A kernel source could not be opened; the message says exactly why."""


class IdentityError(UserError):
    """Identity input that cannot be understood (a malformed watch event line)."""
