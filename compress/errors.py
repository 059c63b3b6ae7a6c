"""One exception type per layer of the system.

Every message names what is at fault (a dotted recipe key, a file, a tensor, a
byte offset) so the CLI can print it as one line and exit with code 2.
"""


class CompressError(Exception):
    """Base of every error that the CLI reports as one line with exit code 2."""


class RecipeError(CompressError):
    """A recipe key is unknown, mistyped, out of range or inconsistent.

    Args:
        key: the dotted path of the key at fault, e.g. ``stages.prune.sparsity``.
        message: what is wrong and what is allowed.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class InputError(CompressError):
    """A file the run needs is missing, unreadable or of the wrong kind (dataset, checkpoint, model)."""


class FormatError(CompressError):
    """A model file is damaged, hostile or not a ``.dcz`` file.

    Args:
        field: the format field at fault, e.g. ``tensor[3].shape``.
        offset: byte offset in the file where the field starts (None when not known).
        message: what is wrong.
    """

    def __init__(self, field: str, offset: int | None, message: str):
        self.field = field
        self.offset = offset
        where = f" at byte {offset}" if offset is not None else ""
        super().__init__(f"{field}{where}: {message}")


class OutputError(OSError):
    """An artifact could not be written (disk full, quota, read-only folder).

    Not a ``CompressError``: the input was fine, the machine failed (exit code 1). The
    file the write would have replaced is untouched (every artifact is written to a
    temporary file and renamed into place).

    Args:
        errno, strerror: from the ``OSError`` that stopped the write.
        filename: the artifact that was being written.
    """


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``RecipeError(key, message)`` unless ``condition`` holds; for ``__post_init__`` validation."""
    if not condition:
        raise RecipeError(key, message)
