"""The one exception type for problems a user can fix (bad file, bad flag, bad path)."""


class InputError(ValueError):
    """A user-caused problem: the message names what was found, what was expected and what to do.

    The CLI prints it as one line and exits with status 2; anything else is a bug and
    keeps its traceback.
    """
