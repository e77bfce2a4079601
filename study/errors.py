"""One exception type for every user-facing mistake.

The CLI turns a ``PrunelabError`` into a one-line message and a non-zero exit instead of a
traceback, so everything that is the user's input (paths, options, data files) raises it.
"""


class PrunelabError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
