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


class RequestError(SloraError, ValueError):
    """A request is invalid (bad prompt, unknown or incompatible adapter, bad sampling values).

    Raised at submission, for that request only; the engine and other requests are unaffected.
    """


class ConfigError(SloraError, ValueError):
    """An experiment config is invalid: an unknown key, a value of the wrong type or out of range.

    The message names the config field (dotted path) and, where it applies, the file.
    """
