"""One exception type for bad user input: the CLI prints its message as a single line, no traceback."""


class UserError(Exception):
    """Bad input or configuration; the message names what is wrong and how to fix it."""


def user_message(e: UserError) -> str:
    """The one line of ``e``. Raised in a Ray task or actor call it arrives as ``RayTaskError(UserError)``,
    whose text is the remote traceback and whose ``cause`` is the error itself."""
    return str(getattr(e, "cause", None) or e)
