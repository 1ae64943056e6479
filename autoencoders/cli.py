"""How a command ends on bad input: one `error:` paragraph on stderr and exit code 2, never a traceback."""

import sys
from typing import NoReturn

from autoencoders.errors import UserError


def exit_with(error: UserError) -> NoReturn:
    """How a single run ends on bad input: the message as one paragraph on stderr, exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def user_error(error: BaseException | None) -> UserError | None:
    """The UserError behind `error`, also when Hydra's instantiate wrapped it (InstantiationException from it)."""
    while error is not None and not isinstance(error, UserError):
        error = error.__cause__
    return error
