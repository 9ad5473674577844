"""The one exception type that reaches a user as a single line."""


class UserError(Exception):
    """Bad input: printed as one line (no traceback) and the command exits non-zero.

    The message says what to change, e.g. "partition 8,8,8 sums to 24 but the model has
    61 layers; give 8 numbers that sum to 61".
    """
