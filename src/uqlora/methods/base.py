"""The protocol every method follows (DESIGN.md "One protocol for every method").

A method sees a model and a function from questions to class scores [B, C]; it never reads files. Its life:
    training   prepare -> on_train_start -> (learning_rate, scoring + loss, [sgd_parameters' step], on_step_end) per
               step -> on_train_end
               -> state_dict() saved in the run's posterior/ (training_state() in checkpoints, for --resume)
    evaluation bind(model, adapters) with each adapter's posterior -> predict per batch of questions
Ensembles (`member_method`) are trained as independent runs of the member method, one per seed.
A sampling method's draw s of member m takes its randomness from `draw_generator(seed, m, s)` alone, so its draws
can be scored one per forward or several in one forward (batched.py) with the same result.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data.question import Question
from ..errors import UqloraError

ScoreFn = Callable[[list[Question]], torch.Tensor]  # questions -> class scores [B, C] (-inf: absent choice)


class Adapter(NamedTuple):
    """One LoRA adapter loaded on the model at evaluation: its PEFT name and its saved posterior tensors."""

    name: str
    posterior: dict[str, torch.Tensor]


def draw_generator(seed: int, member: int, sample: int) -> torch.Generator:
    """A CPU generator for posterior draw `sample` of `member`: the same draw on every batch and process."""
    state = np.random.SeedSequence([seed, member, sample]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


class Method:
    name = "base"
    trains = True  # False: a post-hoc method or zero-shot, applied to a trained (or base) model
    sampling = False  # True: predict draws S > 1 posterior samples (--samples)
    default_samples = 1
    member_method: str | None = None  # ensembles: the method each member is trained with
    trained_by = "train"  # the command that makes runs of this method (`uqlora sft` for sft, sft-full)
    posthoc = False  # True: fitted on a trained run by `uqlora posthoc` (laplace, laplace-ll, temperature)

    def __init__(self, config=None):
        self.config = config  # the run's TrainConfig (None for bare use in tests)
        self.model = None
        self.adapters: list[Adapter] = []
        self.seed = 0

    # ---- training ----
    def prepare(self, model):
        """Wrap or modify layers before training (e.g. variational LoRA); the default changes nothing."""
        return model

    def on_train_start(self, model, total_steps: int, steps_per_epoch: int) -> None:
        """Called once before the first optimizer step (and again when a run resumes)."""

    def learning_rate(self, step: int, scheduled: float) -> float:
        """The learning rate of 0-based optimizer step `step`, given the warm-up/decay schedule's value."""
        return scheduled

    def scoring(self, questions: list[Question]):
        """The context of the training forwards that score `questions` (one micro-batch): a weight-sampling
        method (BLoB) draws one weight sample per question in it; by default nothing."""
        return contextlib.nullcontext()

    def loss(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-question training loss [B] from scores [B, C] and labels [B]; extra terms are added by subclasses."""
        return F.cross_entropy(scores, labels, reduction="none")

    def sgd_parameters(self) -> tuple[list[torch.nn.Parameter], float]:
        """Trainable parameters the run steps by plain SGD at their own lr (times the warm-up/decay factor) after
        each AdamW step, outside AdamW and its clipping, and that lr (C-LoRA's E posterior); by default none."""
        return [], 0.0

    def on_step_end(self, model, step: int) -> None:
        """Called after every optimizer step (e.g. SWAG moment collection); `step` counts from 1."""

    def on_train_end(self, model) -> None:
        """Called after the last step, before the adapter is saved (e.g. SWA writes its mean into the model)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Posterior state, saved as safetensors in the run's posterior/ folder; empty for point estimates."""
        return {}

    def training_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep for a bit-exact --resume; by default the posterior state."""
        return self.state_dict()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise UqloraError(f"method {self.name!r} keeps no training state, but the checkpoint has "
                              f"{sorted(state)[:3]}")

    # ---- evaluation ----
    @property
    def posterior_name(self) -> str:
        """The run's posterior/<name>.safetensors this method reads (a wrapper reads its base method's)."""
        return self.name

    def load_fitted(self, run_dir) -> None:
        """Read what a post-hoc fit left in the run's posterior/ besides the per-adapter tensors (temperature)."""

    def run_settings(self, config: dict, run_dir) -> dict:
        """The run's config.yaml as the TrainConfig-named settings evaluate reads (model, dtype, framing, ...)."""
        return config

    def bind(self, model, adapters: list[Adapter], *, seed: int = 0) -> None:
        """Attach the model with its loaded adapters; `seed` fixes the posterior draws."""
        self.model, self.adapters, self.seed = model, adapters, seed
        for adapter in adapters:
            if adapter.posterior:
                raise UqloraError(f"method {self.name!r} keeps no posterior state, but the run's posterior/ has "
                                  f"{sorted(adapter.posterior)[:3]}: it belongs to another method")

    mean_at_zero_samples = False  # True: `--samples 0` asks for the deterministic posterior mean (BLoB, C-LoRA)
    logits = None  # a LogitStore, set by evaluate where logit_store_sources() names any (posthoc/logit_store.py)

    def logit_store_sources(self) -> tuple[str | None, ...]:
        """The eval folders of this task (None: the run's own predictive, else TASK@NAME) whose saved logit
        Gaussians this predictive can reuse, because they come from the same posterior (Laplace's two links);
        empty: the method keeps none."""
        return ()

    def check_samples(self, n_samples: int | None) -> int:
        """The number of draws per member: the method's default, or `n_samples` where the method samples."""
        if n_samples is None:
            return self.default_samples
        if n_samples == 0 and not self.mean_at_zero_samples:
            raise UqloraError(f"--samples 0 (the posterior mean) applies to blob and clora, not to {self.name!r}")
        if n_samples != 1 and not self.sampling:
            raise UqloraError(f"method {self.name!r} has a deterministic predictive; --samples does not apply")
        return n_samples

    def predict(self, score_fn: ScoreFn, questions: list[Question], n_samples: int) -> torch.Tensor:
        """Class probabilities of S posterior draws: [S, B, C]; a sampling method scores as many draws per call of
        score_fn as `batched.sample_batching` allows (one, outside it)."""
        raise NotImplementedError
