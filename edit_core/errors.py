"""The error every part of the pack raises for a problem the user can fix."""


class EDiTError(ValueError):
    """A problem the user can fix: a wrong file, model or option. The message says what."""
