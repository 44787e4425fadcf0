class PrismError(Exception):
    """A problem the user can fix: the CLI prints it as one line, without a traceback."""


class RequestError(PrismError):
    """What a request asks that cannot be served (a route, a persona, sampling settings, its length): the caller's
    to fix, so the server answers 400. Any other failure while serving is the server's own (500)."""


class ContextLengthError(RequestError):
    """A prompt plus its completion budget does not fit the model's context window."""
