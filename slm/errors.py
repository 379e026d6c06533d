"""The one exception type for problems a user can fix."""


class SlmError(Exception):
    """A bad input or config: the CLI prints it as one line and exits non-zero."""
