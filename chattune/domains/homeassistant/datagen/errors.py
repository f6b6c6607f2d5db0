"""Errors the generator reports to the user (the CLI turns them into exit status 2)."""

from chattune.errors import ChattuneError


class DataGenError(ChattuneError):
    """Bad input or configuration: the message is meant for the person running the generator."""


class PileError(DataGenError):
    """A pile file is malformed; the message names file:line and what was expected."""
