"""The one exception type for bad input (flags, files, data): its message names the problem and the fix.

The command line prints it as one line, without a traceback; anything else is a bug and keeps its traceback.
"""


class InputError(ValueError):
    pass
