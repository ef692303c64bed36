"""The one exception type for problems a user can fix (missing shards, bad flags, bad run dir)."""


class InputError(ValueError):
    """A user-caused problem: the message names what was found, what was expected and what to do.

    The CLI prints it as one line and exits with status 2; anything else keeps its traceback.
    """
