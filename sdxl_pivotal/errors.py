"""The exception types for bad input (flags, files, data) and for outputs that cannot be written: their
message names the problem and the fix.

The command line prints them as one line, without a traceback; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    pass


class WriteError(InputError):
    """A file or folder could not be written (a full disk, a read-only folder): the message names the path,
    the reason and what is intact."""
