"""The one exception type for user mistakes: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (file, config key, value): message names it and says what to do."""
