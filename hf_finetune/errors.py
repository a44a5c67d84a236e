"""The one error type that means "the user's input is wrong": the CLI turns it into one line on stderr and exit 2."""


class InputError(ValueError):
    """Bad recipe, bad data or bad arguments. The message names the file, key or row."""
