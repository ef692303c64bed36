"""The one exception type for problems a user can fix (a bad file, value, path or folder)."""


class InputError(ValueError):
    """A user-caused problem: the message names what was found, what was expected and what to do.

    Both packages raise it; the CLI prints it as one line and exits with status 2. Anything
    else is a bug and keeps its traceback.
    """
