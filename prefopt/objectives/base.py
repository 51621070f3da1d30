"""The interface every objective implements.

An objective is two things:

* a **pure loss function** in its own module (``dpo_loss``, ``simpo_loss``, ...), tensors in,
  tensors out, documented and unit-tested alone;
* a thin :class:`Objective` subclass, registered by name, that declares which roles the
  objective needs and adapts a learner's micro-batch to the pure function.

The learner computes, for every response row of a micro-batch, the *summed* log-probability of
the response tokens under the policy (``policy.logps``) and the number of response tokens
(``policy.num_tokens``). Row order is fixed by :func:`prefopt.data.collate.collate_examples`:

* pairs: ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]`` (one concatenated forward);
* lists: the valid slots of ``batch["slot_mask"]`` (``[B, K]``) in row-major order.

Reference log-probs, when the objective needs them, arrive in ``batch["ref_logps"]`` in the same
row order (computed once before training and cached, never in the training step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from prefopt.registry import Registry


@dataclass
class ObjectiveParams:
    """Parameters common to every objective; each objective subclasses this with its own."""
    name: str = "dpo"

    def validate(self) -> None:
        """Raise ConfigError for an invalid value (run when the recipe is validated)."""


@dataclass
class PolicyOutput:
    logps: torch.Tensor        # [N] summed response log-probs
    num_tokens: torch.Tensor   # [N] response token counts (float)
    # Per-token view, aligned with next-token prediction: index t-1 is the token at position t.
    token_logps: torch.Tensor | None = None   # [N, L-1] log-probs (0 outside token_mask)
    token_mask: torch.Tensor | None = None    # [N, L-1] True on response tokens
    entropy: torch.Tensor | None = None       # [N, L-1] policy entropy (only if the objective asks)


@dataclass
class ValueOutput:
    """A critic's forward, aligned as ``PolicyOutput``'s per-token view."""
    values: torch.Tensor                      # [N, L-1] V(prefix before token t); [N, L-1, H] for H heads
    token_mask: torch.Tensor                  # [N, L-1] True on response tokens


@dataclass
class ScoreOutput:
    """A reward model's forward: its head read at K positions of each row (the last token: K = 1;
    the end of every step for a process reward model)."""
    scores: torch.Tensor                      # [N, K, H] head outputs (H: attributes; 1 for a scalar reward)
    mask: torch.Tensor                        # [N, K] True on real positions (padded steps are False)


@dataclass
class LossOut:
    loss: torch.Tensor                                   # scalar: mean over the micro-batch examples
    # Per-example values ([B]) or scalars; the driver averages them over examples and learners.
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective:
    name: ClassVar[str]
    Params: ClassVar[type[ObjectiveParams]] = ObjectiveParams
    needs: ClassVar[frozenset[str]] = frozenset()        # roles beyond the learner: {"reference"}, ...
    batch_kind: ClassVar[str] = "pairs"                  # "pairs" | "lists" | "sft" | "rollouts"
    algorithm: ClassVar[str] = "preference"              # the algorithm that trains it (prefopt.algorithms)
    model_kind: ClassVar[str] = "policy"                 # "policy" (causal LM) | "reward" (score head)
    # Name of the metric reported as held-out accuracy by evaluations.
    accuracy_metric: ClassVar[str] = "rewards/accuracy"

    def __init__(self, params: ObjectiveParams):
        self.params = params

    # --- what the recipe must provide (checked before Ray starts) ---------------------------------
    @classmethod
    def required_roles(cls, params: ObjectiveParams) -> set[str]:
        """The ``roles.*`` sections the recipe must set for these parameters (default: ``needs``)."""
        return set(cls.needs)

    @classmethod
    def data_kinds(cls) -> tuple[str, ...]:
        """The data row kinds (:func:`prefopt.data.examples.detect_kind`) it trains on."""
        return (cls.batch_kind,)

    @classmethod
    def head_labels(cls, recipe) -> list[str]:
        """A reward model's output names (one head output each); [] for a policy."""
        return []

    @staticmethod
    def check_recipe(recipe) -> None:
        """Checks across the objective and the rest of the recipe; raise ConfigError."""

    @classmethod
    def check_examples(cls, params: ObjectiveParams, examples: list, source: str) -> None:
        """Checks of the loaded examples against the parameters, before Ray starts; raise DataError."""

    @classmethod
    def from_recipe(cls, recipe) -> "Objective":
        """The objective a learner runs for ``recipe`` (defaults that depend on other sections are
        resolved here, on a copy: the recipe itself is left as written)."""
        return cls(recipe.objective)

    # --- what the learner's forward computes for it ---------------------------------------------
    @property
    def temperature(self) -> float:
        """Logits are divided by this before log-probs are taken (online RL's sampling temperature)."""
        return 1.0

    @property
    def wants_entropy(self) -> bool:
        """Whether the forward also computes the per-token entropy (an extra softmax pass)."""
        return False

    def loss(self, policy: PolicyOutput, batch: dict[str, torch.Tensor]) -> LossOut:
        raise NotImplementedError


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Class decorator: registers ``cls`` under ``cls.name``."""
    return OBJECTIVES.register(cls.name)(cls)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ``[2B]`` pairs row vector into (chosen ``[B]``, rejected ``[B]``)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def scatter_slots(values: torch.Tensor, slot_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Place the ``[N]`` row values of a lists batch into a ``[B, K]`` tensor (padded slots = fill)."""
    out = values.new_full(slot_mask.shape, fill)
    out[slot_mask] = values
    return out
