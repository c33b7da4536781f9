"""Errors onegpu raises for a user's mistake: one line that says what to do, no traceback needed."""


class UsageError(ValueError):
    """Bad input or configuration. Its message names the fix."""


class LaunchError(Exception):
    """A job could not start or one of its workers failed; the message says which and what to do."""
