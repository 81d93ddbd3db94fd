"""Error types that the CLI turns into one-line messages and exit code 2."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` on one line: line breaks and other control characters written as escapes (a
    name ending in a newline must not break the one-line error)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class HarnessError(Exception):
    """Base class of the errors a user can cause; never shown with a traceback."""

    exit_code = 2

    def __str__(self) -> str:
        return one_line(super().__str__())


class SpecError(HarnessError):
    """A network spec is invalid.

    Args:
        reason: What is wrong, in words.
        file: The spec file (or a name standing for it).
        path: JSON path of the offending value, e.g. ``$.layers[3].kernel``.
    """

    def __init__(self, reason: str, file: str | None = None, path: str | None = None):
        self.reason = reason
        self.file = file
        self.path = path
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.path) if p]
        return one_line(": ".join([*parts, self.reason]))

    def located(self, file: str | None = None, path: str | None = None) -> "SpecError":
        """Returns a copy with the file and path filled in where still missing."""
        return SpecError(self.reason, self.file or file, self.path or path)


class UsageError(HarnessError):
    """A bad command-line option or value."""


class UnsupportedError(HarnessError):
    """A backend cannot do what was asked (an op, a device, a mode).

    The runner turns it into a result row with status ``unsupported``.
    """
