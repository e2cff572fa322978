"""One exception type for bad user input: the CLI prints its message as a single line, no traceback."""


class UserError(Exception):
    """Bad input or configuration; the message names what is wrong and how to fix it."""
