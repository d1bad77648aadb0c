"""Exceptions raised by numres.

Each one names what went wrong (file, key, URL, expected vs got) so that a user can act on
the message without reading a traceback.
"""


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, malformed, unsafe, or does not fit the model."""


class DownloadError(RuntimeError):
    """Fetching weights failed: network error, HTTP error, truncated body or hash mismatch."""


class BackendUnavailable(RuntimeError):
    """The requested compute backend cannot run here (package missing, no device)."""
