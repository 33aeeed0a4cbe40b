"""The one exception type a user sees: bad input or configuration, with a message that says what to change."""


class CompalignError(Exception):
    """Raised for bad input (missing model, malformed prompt file, wrong direction width, ...).

    Flows catch it at the entry point, log the message once and exit with status 2;
    anything else is a bug and keeps its traceback.
    """


class ConfigError(CompalignError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ``ok``: a config check whose message names the key."""
    if not ok:
        raise ConfigError(message)
