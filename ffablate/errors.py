"""User-facing errors: the CLI prints their message on one line and exits 2."""


class FFablateError(Exception):
    """A mistake the user can fix; the message says how."""


class UnknownPlugin(FFablateError):
    pass


class ConfigError(FFablateError):
    pass


class DataNotFound(FFablateError):
    pass


class ChecksumMismatch(FFablateError):
    pass
