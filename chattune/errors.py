"""The one base of every error chattune reports to the person running it.

A `ChattuneError` is a problem with the user's inputs (flags, data, model folders, piles) whose message already
says what is wrong and what to do: the entry points (chattune.cli) print it on one line and exit with status 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""


class ChattuneError(Exception):
    """A problem with the user's inputs; the message names it (and the file, flag or line) in one line."""
