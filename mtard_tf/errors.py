"""The error type of everything the user can fix (a flag, a file, the data): the command line prints such an error
as one `error:` line and exits 1; any other exception is a defect and keeps its traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, stated in one line that says what to do."""
