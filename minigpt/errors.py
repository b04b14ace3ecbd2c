"""The one error type minigpt raises on purpose for bad input.

`UserError` is a `ValueError` (so library callers can catch either), and the `minigpt` command
reports it as one line on stderr with exit code 2. Any other exception is a bug: the command lets
it through with its traceback. `MINIGPT_DEBUG=1` shows the traceback of a `UserError` too.
"""


class UserError(ValueError):
    """Bad input from the user (a value, a file, an option): the message says what and what to do."""
