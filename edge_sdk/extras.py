"""Extra slots: per-device statistics that ride in the encrypted, noised update.

A round's packing spec may declare extra integer slots after the model
parameters (:class:`edge_sdk.crypto.ExtraSlot`, docs/packing.md "Extra
slots"). The device bounds its value of each to ``[0, bound]``, adds exact
discrete Gaussian noise, and its ledger charges the slot with sensitivity
``bound`` (docs/privacy.md "Extra slots"); the aggregator learns only the
decrypted totals. The slots a device understands form a closed table:

* federated evaluation (all three or none): ``eval_examples`` (held-out
  examples evaluated, at most ``bound``), ``eval_correct`` (of those,
  correctly classified), ``eval_loss`` (their summed loss, each example's
  loss clipped to ``eval_loss.bound / (eval_loss.scale * eval_examples.bound)``);
* adaptive clipping (Andrew et al. 2021): ``clip_below``, a signed slot
  of bound 1: ``+1`` when the device's update norm was at most the round's
  clip, ``-1`` when it was clipped (the paper's ``b - 1/2`` at scale 2, so
  one device moves the sum by 1 unit = half a bit, as in the paper's
  accounting). The fraction unclipped is ``(sum / count + 1) / 2``.

An unknown slot name is refused: a device never releases a statistic whose
meaning it does not know.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.crypto.packing import ExtraSlot, PackingSpec

__all__ = [
    "CLIP_BELOW",
    "EVAL_CORRECT",
    "EVAL_EXAMPLES",
    "EVAL_LOSS",
    "EVAL_SLOTS",
    "KNOWN_SLOTS",
    "FederatedMetrics",
    "clip_slot",
    "evaluation_slots",
    "evaluation_values",
    "evaluation_values_from_summary",
    "federated_metrics",
    "per_example_results",
]

EVAL_EXAMPLES = "eval_examples"
EVAL_CORRECT = "eval_correct"
EVAL_LOSS = "eval_loss"
CLIP_BELOW = "clip_below"
EVAL_SLOTS = (EVAL_EXAMPLES, EVAL_CORRECT, EVAL_LOSS)
#: Every extra slot a device knows how to fill (closed table).
KNOWN_SLOTS = (*EVAL_SLOTS, CLIP_BELOW)


def _slot(
    name: str, bound: int, scale: float, sigma2: Fraction | None, *, signed: bool = False
) -> ExtraSlot:
    s2 = Fraction(0) if sigma2 is None else Fraction(sigma2)
    return ExtraSlot(
        name=name,
        bound=bound,
        scale=float(scale),
        sigma2_num=s2.numerator,
        sigma2_den=s2.denominator,
        signed=signed,
    )


def evaluation_slots(
    *,
    max_examples: int,
    max_loss: float,
    loss_scale: float,
    sigma2: tuple[Fraction, Fraction, Fraction] | None = None,
) -> tuple[ExtraSlot, ExtraSlot, ExtraSlot]:
    """The three federated-evaluation slots.

    Args:
        max_examples: most held-out examples one device counts (the bound of
            ``eval_examples`` and ``eval_correct``).
        max_loss: a per-example loss is clipped to this.
        loss_scale: slot units per 1.0 of loss.
        sigma2: per-device noise variance of (examples, correct, loss) in
            slot units (grid values), or None for rounds without DP.
    """
    if max_examples < 1 or not (math.isfinite(max_loss) and max_loss > 0):
        raise ValueError(f"need max_examples >= 1 and max_loss > 0, got {max_examples}, {max_loss}")
    loss_bound = max(1, math.floor(max_examples * max_loss * loss_scale))
    s = sigma2 or (None, None, None)
    return (
        _slot(EVAL_EXAMPLES, max_examples, 1.0, s[0]),
        _slot(EVAL_CORRECT, max_examples, 1.0, s[1]),
        _slot(EVAL_LOSS, loss_bound, loss_scale, s[2]),
    )


def clip_slot(sigma2: Fraction | None = None) -> ExtraSlot:
    """The adaptive-clipping bit: ``+1`` when the update norm was ``<= clip``, else ``-1``.

    ``sigma2`` is the per-device noise in slot units (2 units per bit).
    """
    return _slot(CLIP_BELOW, 1, 1.0, sigma2, signed=True)


#: Noise headroom (standard deviations) a DP extra slot needs inside the slot
#: range, as the planner leaves for model slots: a device's noised value is
#: then clamped with probability below 2e-9, so clamping (which the sum
#: accounting does not model) stays negligible next to delta.
HEADROOM_SIGMAS = 6.0


def check_slots(
    extras: Sequence[ExtraSlot], noise: Any = None, *, value_max: int | None = None
) -> None:
    """Refuse unknown slot names, a partial evaluation set, and un-noised slots in DP rounds.

    The device (:class:`edge_sdk.pipeline.RoundContext`) and every committee
    member run this same check. ``noise`` is the round's ``NoiseSpec`` (None:
    no DP); with one, every slot must carry at least the noise its
    mechanism's accounting is stated for.

    Raises:
        ValueError: the message says which slot and why.
    """
    if noise is not None:
        from edge_sdk.privacy.mechanisms import mechanism

        floor = mechanism(noise.mechanism).min_sigma2(noise.mode)
        from edge_sdk.privacy._sampler import sigma2_on_grid

        for extra in extras:
            sigma2 = Fraction(extra.sigma2_num, extra.sigma2_den)
            if not extra.noised or sigma2 < floor:
                raise ValueError(f"extra slot {extra.name!r} carries too little noise for DP")
            try:  # refused here, not after training, when the sampler cannot draw it
                on_grid = sigma2_on_grid(sigma2) == sigma2
            except ValueError:
                on_grid = False
            if not on_grid:
                raise ValueError(f"extra slot {extra.name!r}: sigma2 {sigma2} is off the grid")
            reach = extra.bound + HEADROOM_SIGMAS * math.sqrt(float(sigma2))
            if value_max is not None and reach > value_max:
                raise ValueError(
                    f"extra slot {extra.name!r}: bound {extra.bound} plus {HEADROOM_SIGMAS:g} "
                    f"noise deviations exceeds the slot range {value_max} (values would clamp)"
                )
    names = [e.name for e in extras]
    unknown = sorted(set(names) - set(KNOWN_SLOTS))
    if unknown:
        raise ValueError(f"unknown extra slots {unknown}; a device fills only {KNOWN_SLOTS}")
    present = [n for n in EVAL_SLOTS if n in names]
    if present and len(present) != len(EVAL_SLOTS):
        raise ValueError(f"federated evaluation needs all of {EVAL_SLOTS}, got {present}")
    slots = {e.name: e for e in extras}
    bit = slots.get(CLIP_BELOW)
    if bit is not None and not (bit.signed and bit.bound == 1 and bit.scale == 1.0):
        raise ValueError("clip_below must be the signed slot of bound 1 and scale 1")
    if present:
        if any(slots[n].signed for n in EVAL_SLOTS):
            raise ValueError("evaluation slots are unsigned")
        if (
            slots[EVAL_CORRECT].bound != slots[EVAL_EXAMPLES].bound
            or slots[EVAL_EXAMPLES].scale != 1.0
        ):
            raise ValueError("eval_correct must have eval_examples' bound; counts have scale 1")


def per_example_results(
    model: Any, x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    """Per-example correctness and loss of a classifier (``model.predict`` probabilities).

    Softmax models give ``(n, classes)`` probabilities, logistic ones the
    probability of class 1; the loss is the cross-entropy ``-log p(y)``
    (probabilities floored at 1e-12). Regression models (1-D predictions of
    a float target) give squared errors and no correct examples.
    """
    xs = np.asarray(x)
    ys = np.asarray(y)
    pred = np.asarray(model.predict(xs), dtype=np.float64)
    if pred.ndim == 2:
        labels = ys.astype(np.int64)
        p = pred[np.arange(len(labels)), labels]
        return pred.argmax(axis=1) == labels, -np.log(np.maximum(p, 1e-12))
    if np.issubdtype(ys.dtype, np.integer):
        labels = ys.astype(np.int64)
        p = np.where(labels == 1, pred, 1.0 - pred)
        return (pred > 0.5) == (labels == 1), -np.log(np.maximum(p, 1e-12))
    err = (pred - ys.astype(np.float64)) ** 2
    return np.zeros(len(err), dtype=bool), err


def evaluation_values(
    correct: npt.ArrayLike, losses: npt.ArrayLike, packing: PackingSpec
) -> dict[str, float]:
    """A device's bounded (examples, correct, loss sum) for the round's evaluation slots.

    Only the first ``eval_examples.bound`` examples count and each loss is
    clipped to the per-example maximum, so every value is within its slot's
    bound before any noise (the privacy analysis rests on it).
    """
    slots = {e.name: e for e in packing.extras}
    ex, ls = slots[EVAL_EXAMPLES], slots[EVAL_LOSS]
    hits = np.asarray(correct, dtype=bool).reshape(-1)[: ex.bound]
    loss = np.asarray(losses, dtype=np.float64).reshape(-1)[: ex.bound]
    if hits.size != loss.size:
        raise ValueError(f"{hits.size} correctness flags for {loss.size} losses")
    max_loss = ls.bound / (ls.scale * ex.bound)
    loss = np.clip(np.nan_to_num(loss, nan=max_loss, posinf=max_loss), 0.0, max_loss)
    return {
        EVAL_EXAMPLES: float(hits.size),
        EVAL_CORRECT: float(np.count_nonzero(hits)),
        EVAL_LOSS: float(loss.sum()),
    }


def evaluation_values_from_summary(
    *, examples: int, accuracy: float | None, mean_loss: float, packing: PackingSpec
) -> dict[str, float]:
    """Bounded evaluation values from a trainer's summary (a ``Trainer.evaluate`` result).

    For trainers that report only a mean loss and an accuracy: at most
    ``eval_examples.bound`` examples count, the mean loss is clipped to the
    per-example maximum (so the loss sum stays within its bound), and the
    correct count is ``accuracy * examples`` (0 without an accuracy).
    """
    slots = {e.name: e for e in packing.extras}
    ex, ls = slots[EVAL_EXAMPLES], slots[EVAL_LOSS]
    n = float(min(max(int(examples), 0), ex.bound))
    max_loss = ls.bound / (ls.scale * ex.bound)
    loss = mean_loss if math.isfinite(mean_loss) else max_loss
    acc = 0.0 if accuracy is None or not math.isfinite(accuracy) else accuracy
    return {
        EVAL_EXAMPLES: n,
        EVAL_CORRECT: min(max(acc, 0.0), 1.0) * n,
        EVAL_LOSS: min(max(loss, 0.0), max_loss) * n,
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class FederatedMetrics:
    """What the decrypted extra slots of one round say (noised totals).

    Attributes:
        examples: held-out examples evaluated over the fleet (noised), or None.
        accuracy: noised correct / noised examples, or None.
        loss: noised loss sum / noised examples, or None.
        clip_fraction: noised share of contributors whose norm was <= clip
            (the paper's ``b_hat``; may leave [0, 1] by the noise), or None.
    """

    examples: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    clip_fraction: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        """Plain-dict form."""
        return {
            "examples": self.examples,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "clip_fraction": self.clip_fraction,
        }


def federated_metrics(
    sums: Mapping[str, int] | npt.ArrayLike, packing: PackingSpec, *, count: int
) -> FederatedMetrics:
    """Turn the decrypted extra-slot totals into figures.

    Args:
        sums: the signed integer totals of the extra slots, in packing order
            (or a name -> total mapping).
        packing: the round's packing spec.
        count: contributions in the sum.
    """
    if isinstance(sums, Mapping):
        totals = {k: int(v) for k, v in sums.items()}
    else:
        arr = np.asarray(sums, dtype=np.int64).reshape(-1)
        if arr.size != len(packing.extras):
            raise ValueError(f"{arr.size} extra totals for {len(packing.extras)} extra slots")
        totals = {e.name: int(v) for e, v in zip(packing.extras, arr, strict=True)}
    slots = {e.name: e for e in packing.extras}
    examples = accuracy = loss = fraction = None
    if EVAL_EXAMPLES in totals:
        examples = totals[EVAL_EXAMPLES] / slots[EVAL_EXAMPLES].scale
        if examples >= 1:
            accuracy = min(max(totals[EVAL_CORRECT] / examples, 0.0), 1.0)
            loss = max(totals[EVAL_LOSS] / slots[EVAL_LOSS].scale, 0.0) / examples
    if CLIP_BELOW in totals:
        fraction = (totals[CLIP_BELOW] / count + 1.0) / 2.0
    return FederatedMetrics(examples=examples, accuracy=accuracy, loss=loss, clip_fraction=fraction)
