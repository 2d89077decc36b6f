"""The one exception type for errors a user can cause and fix."""


class LlmkitError(Exception):
    """A user-facing error: the message says what went wrong and what to do."""
