"""The one exception type that the CLI turns into a single line on stderr and exit status 2."""


class UserError(Exception):
    """Bad input from the user (a path, a preset, a config key, a device): no traceback is shown."""
