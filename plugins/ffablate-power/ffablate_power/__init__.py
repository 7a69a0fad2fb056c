"""An ffablate plugin living outside the core: goodness = mean |h|^p per sample.

Install it (``pip install -e plugins/ffablate-power``) and ``ffablate plugins goodness`` lists ``power``; then
``ffablate train --set goodness=power --set goodness.p=3 --set negatives=random-label --set loss=softplus-threshold``.
"""

from ffablate import hookimpl


class PowerMean:
    """Mean of |h|^p over a sample's units; p=2 is mean-of-squares, p=1 the L1 goodness."""

    per_class = False

    def __init__(self, p: float = 3.0):
        self.p = p

    def __call__(self, paths, num_classes):
        return paths.goodness_input.flatten(1).float().abs().pow(self.p).mean(dim=1)


@hookimpl
def ffablate_register_goodness(register):
    register(
        "power",
        PowerMean,
        "mean |h|^p per sample (example plugin)",
        space={"p": {"type": "float", "low": 1.0, "high": 4.0}},
    )
