"""The exception tree.

Every error the library raises on purpose is a ``WsiScanError``. Subclasses also inherit the
builtin a caller would naturally catch (``FileNotFoundError``, ``ValueError``...), so code that
does not know about wsi-scan still handles them sensibly. Messages say what was expected, what
was found and what to do; the CLI prints ``str(error)`` as one line and exits with ``exit_code``.
"""

from __future__ import annotations


class WsiScanError(Exception):
    """Base class of all wsi-scan errors."""

    exit_code = 1


class UsageError(WsiScanError, ValueError):
    """Invalid arguments or settings given by the user."""

    exit_code = 2


class OutsideGridError(UsageError, IndexError):
    """A level-0 point or cell index lies outside a heatmap's grid."""


class SlideError(WsiScanError):
    """A slide cannot be used."""

    exit_code = 3


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist or is not a file."""


class SlideFormatError(SlideError, ValueError):
    """The file exists but is not a readable whole-slide image (or is damaged)."""


class SlideIndexError(SlideFormatError):
    """A TIFF whose header declares more tiles than it indexes: every reader, OpenSlide too, would
    be asked for pixels that are not in the file."""


class MppError(SlideError, ValueError):
    """The physical pixel size is missing, inconsistent or unsuitable."""


class OutputExistsError(WsiScanError, FileExistsError):
    """The output path exists and ``overwrite`` was not requested."""

    exit_code = 4


class ModelError(WsiScanError, ValueError):
    """A model file cannot be loaded safely, or its card is invalid."""

    exit_code = 5


class DataError(WsiScanError, ValueError):
    """A training or evaluation data set is missing pieces or malformed."""

    exit_code = 6


class HeatmapError(WsiScanError, ValueError):
    """A heatmap store is missing, incomplete or does not follow the contract."""

    exit_code = 7


class OutputWriteError(WsiScanError, OSError):
    """An output could not be written: the disk is full, the folder read-only, or permission denied."""

    exit_code = 9


class SlidesFailedError(WsiScanError):
    """A folder run finished but some of its slides failed (each is listed in the run report)."""

    exit_code = 8
