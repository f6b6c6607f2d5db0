"""The error of model access: a model, adapter or tokenizer that cannot be used as given."""

from chattune.errors import ChattuneError


class ModelError(ChattuneError, ValueError):
    """A model, adapter, tokenizer or device that cannot be used; the message names it and what to do."""


class IncompleteWeightsError(ModelError):
    """A weights file that is missing or cut short, as a process killed while saving leaves it."""
