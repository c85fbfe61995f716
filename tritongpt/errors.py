"""One exception type for mistakes a user can fix; the CLI prints it as one line."""


class UserError(Exception):
    """Bad input from the user (file, field, shape, option): printed as `error: ...`, exit 2."""
