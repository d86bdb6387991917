"""Project exceptions: errors a user can cause (bad path, bad image, wrong checkpoint).

Every message names the file and the fix; the CLI prints it on one line and exits non-zero.
"""

from __future__ import annotations


class PSPError(Exception):
    """Base class of every error a user can cause in psp-engine."""


class CheckpointError(PSPError):
    """A checkpoint file is missing, unreadable, of the wrong kind, or does not match its architecture."""


class InputImageError(PSPError):
    """An input image cannot be read or converted to the encoder's input."""


class UsageError(PSPError, ValueError):
    """A bad option or argument (backend, device, precision, --input ...): a ValueError the CLI reports in one line."""
