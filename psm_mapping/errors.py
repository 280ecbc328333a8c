"""Exception hierarchy. Every message names the problem *and* the fix.

The CLI turns any :class:`PSMError` into one line on stderr and exit code 2.
"""
from __future__ import annotations

import re

#: settings whose command-line flag is not ``--`` + the name with dashes
SETTING_FLAGS = {"zoom_levels": "--zoom-level", "queries": "--query", "fuse": "--no-fusion",
                 "previews": "--no-previews", "imagery_options": "--imagery-option"}
#: what a library caller sets for a flag that is not ``--name`` (the rest: ``--a-b`` -> ``a_b``)
_FLAG_SETTINGS = {**{f: s for s, f in SETTING_FLAGS.items()}, "--no-fusion": "fuse=False",
                  "--no-previews": "previews=False"}
_FLAG = re.compile(r"(?<![\w-])(?<!psm-map )--[a-z][a-z0-9-]*")


def flag(option: str) -> str:
    """The command-line spelling of a setting (``zoom_levels`` -> ``--zoom-level``)."""
    return SETTING_FLAGS.get(option, "--" + option.replace("_", "-"))


def setting(flag_text: str) -> str:
    """The library spelling of a command-line flag (``--min-valid`` -> ``min_valid``)."""
    return _FLAG_SETTINGS.get(flag_text, flag_text[2:].replace("-", "_"))


class PSMError(Exception):
    """Base class of every error psm-mapping raises on purpose.

    Messages are written once, naming command-line flags; ``str(exc)`` (what a notebook sees)
    names the settings instead (``--min-valid`` -> ``min_valid``), :attr:`cli_message` keeps
    the flags. ``option`` names the setting at fault (a :class:`~psm_mapping.config.MapConfig`
    field such as ``"zoom_levels"`` or ``"out"``), so a caller can point at its own spelling."""

    exit_code = 2

    def __init__(self, *args, option: str | None = None):
        super().__init__(*args)
        self.option = option

    @property
    def cli_message(self) -> str:
        """The message as the command line shows it (``--flag`` spelling)."""
        return super().__str__()

    def __str__(self) -> str:
        # commands quoted in backticks (`psm-map weights download NAME`) keep their flags
        parts = super().__str__().split("`")
        return "`".join(p if i % 2 else _FLAG.sub(lambda m: setting(m.group(0)), p) for i, p in enumerate(parts))


class InputError(PSMError, ValueError):
    """Bad user input: a value out of range, a missing file, an unreadable region."""


class CheckpointError(PSMError):
    """A checkpoint that is missing, corrupt, unsafe or does not match the model."""


class TokenizerError(PSMError):
    """The text tokenizer cannot be found or loaded."""


class AudioError(InputError):
    """An audio file is unreadable, empty or silent."""


class AudioTooLongError(AudioError):
    """An audio clip longer than the limit (``seconds`` > ``max_seconds``)."""

    def __init__(self, *args, seconds: float = 0.0, max_seconds: float = 0.0, option: str | None = None):
        super().__init__(*args, option=option)
        self.seconds, self.max_seconds = seconds, max_seconds


class ImageryError(PSMError):
    """An imagery source is unreadable, unreachable or does not cover the region."""


class ServerDeadError(ImageryError):
    """An imagery server stopped answering during a run (every request of a time window got
    no answer): the run stops; what it finished stays in the store and a rerun resumes."""


class RegionError(InputError):
    """A region file or bbox is empty, invalid or not a vector dataset."""


class StoreError(PSMError):
    """An embedding store is corrupt or was built with other settings."""


class OutputError(PSMError):
    """An output cannot be written (exists, folder not writable, ...)."""
