class UserError(Exception):
    """Bad input from the user: printed as one paragraph without a traceback, exit code 2."""


class EveryProcessError(UserError):
    """A UserError that every DDP process raises at the same step (the NaN guard's): printed by rank 0 alone."""


def check_positive(key: str, value: object, example: str) -> None:
    """A UserError unless `value` is a number > 0 (e.g. a learning rate)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise UserError(f"{key}={value!r} is not a positive number. Set e.g. {key}={example}.")


def check_non_negative(key: str, value: float, example: str) -> None:
    """A UserError if `value` (a weight) is negative."""
    if value < 0:
        raise UserError(f"{key}={value!r} is negative. Use a weight >= 0, e.g. {key}={example}.")
