"""Errors raised by slora-jax for bad input files and bad requests."""


class SloraError(Exception):
    """Base class of every error slora-jax raises on purpose."""


class CheckpointError(SloraError, ValueError):
    """A base-model checkpoint folder is unreadable, incomplete or unsupported.

    The message names the file and, where it applies, the tensor or config field.
    """


class AdapterError(SloraError, ValueError):
    """A LoRA adapter folder is unreadable, malformed or of an unsupported kind.

    The message names the file and the problem.
    """
