"""The error every weight format raises for a bad file or directory, and the wrapper that turns a reader's own
errors into it."""

from __future__ import annotations

import contextlib


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or tensors, has unexpected ones, or has the wrong shapes."""


@contextlib.contextmanager
def naming_file(file: str):
    """Report safetensors' own errors (a truncated header or data), which name no file, as a CheckpointError
    naming `file`."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' errors (truncated header/data) name no file
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupted?): "
                              f"{type(e).__name__}: {e}") from None
