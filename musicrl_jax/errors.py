"""Errors caused by the user's input (config, files, data), reported without a traceback."""


class ConfigError(ValueError):
    """Bad configuration or input; the message names the setting or file and the fix."""


class Preempted(Exception):
    """A training loop saved the step it was at and stopped on SIGTERM (a scheduler's
    preemption notice). Raised after the save so that no later stage of a pipeline or study
    runs on an unfinished model; the same command resumes."""
