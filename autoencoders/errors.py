class UserError(Exception):
    """Bad input from the user: printed as one paragraph without a traceback, exit code 2."""


class EveryProcessError(UserError):
    """A UserError that every DDP process raises at the same step (the NaN guard's): printed by rank 0 alone."""


class FileSystemError(UserError):
    """A write (or read) that the file system refused: full, over quota, read-only, no permission (cli.user_error)."""
