"""The one error type that means "the user's input is wrong": the CLI turns it into one line on stderr and exit 2."""


class InputError(ValueError):
    """Bad recipe, bad data or bad arguments. The message names the file, key or row."""


class DiskFull(OSError):
    """A save failed for lack of space; what was saved before is intact. The CLI says so in one line and exits 1 (the
    input was fine: the machine ran out of room)."""


class Stopped(RuntimeError):
    """Training stopped on a signal after writing a checkpoint; the message says how to resume. The CLI exits with
    128 + the signal's number, as a shell reports a process ended by it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
