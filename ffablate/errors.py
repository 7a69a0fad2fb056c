"""User-facing errors: the CLI prints their message on one line and exits 2."""


class FFablateError(Exception):
    """A mistake the user can fix; the message says how."""


class FFablateWarning(UserWarning):
    """Something the user should know that stops nothing; the CLI prints it on one line."""


class UnknownPlugin(FFablateError):
    pass


class ConfigError(FFablateError):
    pass


class PluginContractError(ConfigError):
    """A plugin returned what its contract refuses (a wrong shape, T = 0, a loss with no gradient): the plugin's
    bug, as when it raises. A study stops on it instead of recording the point as failed for good, so that the
    rerun after the fix runs the point."""


class CheckpointError(FFablateError):
    """A checkpoint that cannot be written or read back: not one of ffablate's, damaged, of a newer format, or needing
    plugins that are not installed as they were at training."""


class DataError(FFablateError):
    """The dataset's files (or the packages that read them) are missing or broken: every run on it fails alike
    until the user fixes them, so a study stops instead of recording its trials as failed for good."""


class DataNotFound(DataError):
    pass


class ParameterNeeded(DataNotFound):
    """A dataset cannot be looked for until a parameter is set (imagefolder's path): `data list` says which one, and
    a study, which knows its configurations' values, asks again with them."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ChecksumMismatch(DataError):
    pass


def described(value: object) -> str:
    """What a plugin returned, for a message: a tensor's dtype and shape, else its type."""
    import torch  # late: errors is imported where torch is not needed

    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def first_line(exc: BaseException) -> str:
    """``TypeError: its message's first line``: an exception on one line, for a message of ours."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
