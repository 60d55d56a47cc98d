"""User-facing errors: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (path, argument, file content). The message names the culprit."""
