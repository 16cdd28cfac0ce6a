"""Temperature scaling (Guo, Pleiss, Sun, Weinberger 2017, "On Calibration of Modern Neural Networks", §4.2) on
top of any run's predictive: each posterior draw p_s becomes p_s^T ∝ exp(log p_s / T) (for a point estimate,
softmax(logits / T)), T fitted by NLL on validation questions (`uqlora posthoc RUN --method temperature`,
posthoc/temperature.py). The base method (map, swag, laplace, ensemble, ...) is in the run's `base_method`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import runs
from ..errors import UqloraError
from ..posthoc.temperature import apply_temperature
from .base import Adapter, Method, ScoreFn

FIT_FILE = "temperature.json"


class TemperatureMethod(Method):
    name = "temperature"
    posthoc = True

    def __init__(self, config=None):
        super().__init__(config)
        from . import get_method

        base = getattr(config, "base_method", None)
        self.temperature: float | None = None
        if config is None:  # bare use (evaluate asks the class for run_settings before reading the config)
            self.base = Method()
            return
        if base is None or base == self.name:
            raise UqloraError("temperature scaling is fitted on a trained run: `uqlora posthoc RUN --method "
                              "temperature --out DIR` (its base_method is missing)")
        self.base = get_method(base, config)

    # the base method's run layout and sampling
    trains = property(lambda self: self.base.trains)
    member_method = property(lambda self: self.base.member_method)
    posterior_name = property(lambda self: self.base.posterior_name)
    sampling = property(lambda self: self.base.sampling)
    default_samples = property(lambda self: self.base.default_samples)

    def prepare(self, model):
        return self.base.prepare(model)

    def load_fitted(self, run_dir: Path) -> None:
        self.base.load_fitted(run_dir)
        path = Path(run_dir) / runs.POSTERIOR / FIT_FILE
        if not path.is_file():
            raise UqloraError(f"{run_dir} has no fitted temperature ({path} is missing); "
                              "make it with `uqlora posthoc RUN --method temperature --out DIR`")
        value = runs.read_json(path).get("temperature")
        if not isinstance(value, (int, float)) or not value > 0:
            raise UqloraError(f"{path}: temperature must be a number > 0, got {value!r}")
        self.temperature = float(value)

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        self.model, self.adapters, self.seed = model, adapters, seed
        self.base.bind(model, adapters, seed=seed)

    def check_samples(self, n_samples: int | None) -> int:
        return self.base.check_samples(n_samples)

    def predict(self, score_fn: ScoreFn, questions, n_samples: int) -> torch.Tensor:
        if self.temperature is None:
            raise UqloraError("temperature scaling: no temperature loaded (load_fitted was not called)")
        return apply_temperature(self.base.predict(score_fn, questions, n_samples), self.temperature)  # [S, B, C]
