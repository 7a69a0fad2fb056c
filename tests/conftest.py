import pytest

from ffablate import hookimpl
from ffablate.config import RunConfig
from ffablate.plugins import Registry, make_plugin_manager

# Small but real: the first 1,000 Fashion-MNIST training images, two epochs, a narrow CNN, scored on a fixed
# stratified 1,000 of the test images (all 10,000 cost ten passes each for a label-embedding goodness).
TINY = {
    "dataset": "fashion-mnist",
    "limit_train": 1000,
    "limit_test": 1000,
    "epochs": 2,
    "batch_size": 50,
    "channels": "20,20",
    "strides": "2,2",
}

# Variables that switch ffablate's data lookup, kernels or study storage: one set in the shell must not change what a
# test sees.
FFABLATE_ENV = (
    "FFABLATE_DATA",
    "FFABLATE_NO_OFFLINE",
    "FFABLATE_KERNELS",
    "FFABLATE_CPU_STREAM",
    "FFABLATE_CPU_PREFETCH",
    "FFABLATE_CUDA_SCHEDULE",
    "FFABLATE_CUDA_LAG",
    "FFABLATE_CUDA_CLUSTER_KB",
    "FFABLATE_PLUGINS",
    "FFABLATE_STORAGE",
)


@pytest.fixture(scope="session")
def _empty_data_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("empty-data-root")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, _empty_data_root) -> None:
    """No FFABLATE_* variable from the shell, and a data root that is empty: datasets come from the offline
    packages (Fashion-MNIST, MNIST) or from a folder the test makes, never from ~/.cache/ffablate/data."""
    for name in FFABLATE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FFABLATE_DATA", str(_empty_data_root))


@pytest.fixture
def tiny_config() -> RunConfig:
    return RunConfig().with_updates(TINY)


def tiny_args(*extra: str) -> list[str]:
    args = []
    for key, value in TINY.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


def registry_with(*plugins: object) -> Registry:
    return Registry(make_plugin_manager(plugins))


def _registering(kind: str):  # noqa: ANN202
    @hookimpl(specname=f"ffablate_register_{kind}")
    def hook(self, register):  # noqa: ANN001, ANN202
        if self.kind == kind:
            register(self.name, self.factory, "test plugin", space=self.space)

    return hook


class OnePlugin:
    """Registers ``factory`` as the ``kind`` plugin named ``name`` (default "probe")."""

    def __init__(self, kind: str, factory, space=None, name: str = "probe"):
        self.kind, self.factory, self.space, self.name = kind, factory, space, name

    ffablate_register_goodness = _registering("goodness")
    ffablate_register_loss = _registering("loss")
    ffablate_register_fusion = _registering("fusion")
    ffablate_register_datasets = _registering("datasets")
    ffablate_register_temperature = _registering("temperature")
    ffablate_register_norm = _registering("norm")
    ffablate_register_negatives = _registering("negatives")
