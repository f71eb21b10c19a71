"""Errors caused by the user's input (config, files, data), reported without a traceback."""


class ConfigError(ValueError):
    """Bad configuration or input; the message names the setting or file and the fix."""
