"""One exception type for every user-facing mistake.

The CLI turns a ``PrunelabError`` into a one-line message and a non-zero exit instead of a
traceback, so everything that is the user's input (paths, options, data files) raises it.
"""


class PrunelabError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class FileProblem(PrunelabError):
    """A file that cannot be read, written or parsed: the message starts with the file's name.

    Readers raise it (``prunelab.readers``) so that every corrupt model, data, study or work file
    ends in the same one-line form, ``<path>: <what is wrong>``.
    """

    def __init__(self, path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")
