"""Exception hierarchy. Every message names the problem *and* the fix.

The CLI turns any :class:`PSMError` into one line on stderr and exit code 2.
"""
from __future__ import annotations


class PSMError(Exception):
    """Base class of every error psm-mapping raises on purpose.

    ``option`` names the setting at fault (a :class:`~psm_mapping.config.MapConfig` field such as
    ``"zoom_levels"`` or ``"out"``), so a caller can point at its own spelling of it; the CLI
    maps it to the ``--flag``."""

    exit_code = 2

    def __init__(self, *args, option: str | None = None):
        super().__init__(*args)
        self.option = option


class InputError(PSMError, ValueError):
    """Bad user input: a value out of range, a missing file, an unreadable region."""


class CheckpointError(PSMError):
    """A checkpoint that is missing, corrupt, unsafe or does not match the model."""


class TokenizerError(PSMError):
    """The text tokenizer cannot be found or loaded."""


class AudioError(InputError):
    """An audio file is unreadable, empty or silent."""


class ImageryError(PSMError):
    """An imagery source is unreadable, unreachable or does not cover the region."""


class RegionError(InputError):
    """A region file or bbox is empty, invalid or not a vector dataset."""


class StoreError(PSMError):
    """An embedding store is corrupt or was built with other settings."""


class OutputError(PSMError):
    """An output cannot be written (exists, folder not writable, ...)."""
