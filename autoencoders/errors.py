class UserError(Exception):
    """Bad input from the user: printed as one paragraph without a traceback, exit code 2."""
