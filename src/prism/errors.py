class PrismError(Exception):
    """A problem the user can fix: the CLI prints it as one line, without a traceback."""


class ContextLengthError(PrismError):
    """A prompt plus its completion budget does not fit the model's context window."""
