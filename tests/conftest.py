import pytest

from ffablate.config import RunConfig

# Small but real: the first 1,000 Fashion-MNIST training images, one epoch, a narrow CNN.
TINY = {
    "dataset": "fashion-mnist",
    "limit_train": 1000,
    "epochs": 2,
    "batch_size": 50,
    "channels": "20,20",
    "strides": "2,2",
}


@pytest.fixture
def tiny_config() -> RunConfig:
    return RunConfig().with_updates(TINY)


def tiny_args(*extra: str) -> list[str]:
    args = []
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]
