"""The error of bad input data, raised where rows are read (sources) and where they are converted (formats)."""

from chattune.errors import ChattuneError


class DataError(ChattuneError, ValueError):
    """Bad input data; the message names the file (and line when there is one)."""
