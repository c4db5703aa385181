"""Errors caused by the user's input: the CLI prints them as one line, without a traceback."""


class UserError(ValueError):
    """A bad experiment file, plan file, argument or missing local file; the message says the fix."""
