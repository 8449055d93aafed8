"""Utility study: what encryption and distributed DP cost in accuracy.

For each fleet (dataset, number of devices) the study compares five ways of
training the same model:

* ``central``: the model trained on all training data in one place;
* ``float``: plain federated averaging on float deltas;
* ``he``: clipped, quantized deltas summed under Paillier (no noise);
* ``he_float_config``: ``he`` at the float winner's exact configuration,
  only the clip chosen (isolates the cost of clipping and quantization);
* ``dp``: ``he`` plus distributed DP noise for each target epsilon;
* ``dp_default_quorum`` (optional): one ``dp`` configuration re-run with the
  default quorum (half the fleet) to show what the quorum costs;
* ``dp_adaptive``: ``dp`` with adaptive clipping (Andrew et al. 2021) and no
  hand-tuned clip: the clip starts at :data:`ADAPTIVE` ``initial_clip`` and
  follows the median update norm; tuned like ``dp`` over rounds and the
  server optimizer only.

Federated evaluation (``federated_evaluation`` in the output): the ``he``
winner and the ``dp`` and ``dp_adaptive`` winners at the fleet's headline
epsilon re-run with evaluation every round, the devices' noised federated
accuracy (on their shares of the validation split) printed next to the
central test accuracy of the same model. Evaluation costs epsilon, so the
DP runs there calibrate their model noise for it (their test accuracy is not
the row's).
* strategies (optional, :attr:`FleetPlan.strategies_epsilon`):
  ``float_fedprox``, ``float_fedyogi``, ``float_fedadagrad`` and
  ``dp_fedprox``, ``dp_fedyogi``, ``dp_fedadagrad`` at one epsilon. Each
  keeps the float winner's local training (and, under DP, the ``dp``
  winner's clip at that epsilon) and tunes only its own knob: the FedProx
  ``prox_mu`` (with the winner's server optimizer), or the server learning
  rate of FedYogi / FedAdagrad; float rows early-stop on validation like
  ``float``, DP rows also choose the rounds from ``dp_rounds``.

Every setting is tuned on the VALIDATION split only (``eval_split="val"``)
over a fixed grid; the configuration with the best mean validation accuracy
over the selection seeds wins (ties: fewer rounds, then grid order). Only
then is the test split touched: the winner is re-run on fresh seeds (new
partition, new SGD order, new noise draws) and the mean TEST accuracy is
reported. The grids and the rule are data here (:class:`FleetPlan`), so the
docs quote them and a reader can re-run them.

Tuning is staged, as a practitioner with a limited budget would do it:
``float`` tunes local training (epochs, learning rate), the server optimizer
and the number of rounds (early stopping on validation, free because a float
run's first ``r`` rounds do not depend on the horizon); ``he`` keeps the
float winner's local training and tunes the clip, the server optimizer and
the rounds; ``dp`` keeps the same local training and tunes the number of
rounds (which fixes the noise through composition), the clip and the server
optimizer for each epsilon. Rounds cannot be early-stopped under DP: the noise
is calibrated for the whole horizon, and the epsilon reported is the one
spent over all of it.

The quorum (``min_clients``) is the whole fleet: the simulation has full
participation and no drop-outs, so every round's sum holds every device and
each device adds ``1/devices`` of the noise variance. A deployment with
drop-outs must set the quorum to the number of honest contributors it can
count on (docs/privacy.md); the ``dp_default_quorum`` row shows the price.

Every run goes through the product's round machine, key holder and device
pipeline (:mod:`firmware_sim.engine`): the machine's quorum, deadline,
``mean_delta`` and server optimizer decide every round, the devices draw
their rounding and noise from the OS CSPRNG, and the epsilon reported is the
largest any device's own privacy ledger charged. Crypto is the engine's fast
path (``crypto=False``: unblinded ciphertexts ``1 + n*m mod n^2``, summed
and decrypted for real but not hiding); its aggregates are bit-identical to
fully encrypted ones for the same randomness (tested in the engine), so
accuracy does not depend on it. One round with crypto on is timed
separately.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_sdk.errors import EdgeFLError
from edge_sdk.privacy import CalibrationError
from firmware_sim.committee import InMemoryCommittee
from firmware_sim.datasets import Dataset, load_dataset
from firmware_sim.engine import FEDERATION, SimConfig, SimResult, central_baseline, run

__all__ = [
    "FleetPlan",
    "Row",
    "StudyPlan",
    "extend_study",
    "format_table",
    "full_plan",
    "quick_plan",
    "run_study",
    "target_checks",
]

Server = tuple[str, float]

#: The adaptive-clipping settings of every ``dp_adaptive`` row (fixed, not
#: tuned): target the median norm; a geometric step of 1.0 (the paper's 0.2
#: is for hundreds of rounds; these horizons are 3 to 8 rounds, so the clip
#: must be able to cross a decade); first clip 0.1 (the paper's); bit noise
#: sigma_b = expected contributors / 10 (the paper suggests / 20).
ADAPTIVE: dict[str, float] = {"quantile": 0.5, "lr": 1.0, "initial_clip": 0.1}
Keys = InMemoryCommittee
Progress = Callable[[str], None]

# Failures a diverging candidate can raise (NaN deltas are refused by the
# clip; an overflowing model can make numpy raise). They disqualify it.
_CANDIDATE_FAILURES = (ArithmeticError, ValueError, EdgeFLError)


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetPlan:
    """The tuning grid of one fleet.

    Attributes:
        dataset: dataset name (see :func:`firmware_sim.datasets.load_dataset`).
        devices: fleet size.
        central_epochs: central training epochs to try.
        central_lrs: central learning rates to try.
        local: (local epochs, local lr) pairs tried by ``float``.
        servers: (optimizer, server lr) pairs tried by ``float`` and ``he``.
        max_rounds: early-stopping horizon of ``float`` and ``he``.
        clips: L2 clips tried by ``he``.
        dp_rounds: round counts tried by ``dp``.
        dp_clips: L2 clips tried by ``dp``.
        dp_servers: (optimizer, server lr) pairs tried by ``dp``.
        selection_seeds: seeds averaged on the validation split.
        test_seeds: fresh seeds the winner is re-run on (test split).
        default_quorum_epsilon: also report the ``dp`` winner at this epsilon
            with the engine's default quorum (None: skip).
        adaptive_epsilons: epsilons of the ``dp_adaptive`` rows.
        headline_epsilon: the epsilon of the federated-evaluation runs.
        strategies_epsilon: run the strategy rows (FedProx, FedYogi,
            FedAdagrad; float and DP at this epsilon) (None: skip).
        prox_mus: FedProx coefficients tried by the strategy rows.
        yogi_lrs: FedYogi server learning rates tried by the strategy rows.
        adagrad_lrs: FedAdagrad server learning rates tried by the strategy rows.
    """

    dataset: str
    devices: int
    central_epochs: tuple[int, ...]
    central_lrs: tuple[float, ...]
    local: tuple[tuple[int, float], ...]
    servers: tuple[Server, ...]
    max_rounds: int
    clips: tuple[float, ...]
    dp_rounds: tuple[int, ...]
    dp_clips: tuple[float, ...]
    dp_servers: tuple[Server, ...]
    selection_seeds: tuple[int, ...] = (0,)
    test_seeds: tuple[int, ...] = (10, 11, 12)
    default_quorum_epsilon: float | None = None
    adaptive_epsilons: tuple[float, ...] = ()
    headline_epsilon: float | None = None
    strategies_epsilon: float | None = None
    prox_mus: tuple[float, ...] = ()
    yogi_lrs: tuple[float, ...] = ()
    adagrad_lrs: tuple[float, ...] = ()

    def grid_size(self, epsilons: int) -> int:
        """Number of (configuration, seed) tuning runs the plan costs."""
        per_seed = (
            len(self.local) * len(self.servers)
            + len(self.clips) * len(self.servers)
            + epsilons * len(self.dp_rounds) * len(self.dp_clips) * len(self.dp_servers)
        )
        if self.strategies_epsilon is not None:
            knobs = len(self.prox_mus) + len(self.yogi_lrs) + len(self.adagrad_lrs)
            per_seed += knobs * (1 + len(self.dp_rounds))
        return per_seed * len(self.selection_seeds)


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyPlan:
    """The whole study: fleets, privacy targets and the shared model settings.

    Attributes:
        fleets: one grid per fleet.
        epsilons: DP targets (each a separate ``dp`` row).
        delta: DP delta.
        model: engine model name (``softmax`` or ``onnx-mlp``).
        hidden: hidden units of ``onnx-mlp``.
        batch_size: local (and central) SGD batch size.
        alpha: Dirichlet label-skew concentration of the partition.
        key_bits: Paillier key size (fixes the packing; crypto is off).
        crypto_round: time one round with crypto on for the largest fleet.
    """

    fleets: tuple[FleetPlan, ...]
    epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    delta: float = 1e-5
    model: str = "softmax"
    hidden: int = 32
    batch_size: int = 16
    alpha: float = 0.5
    key_bits: int = 2048
    crypto_round: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One (dataset, devices, setting) result.

    Attributes:
        accuracy: mean TEST accuracy of the chosen configuration over the
            fleet's test seeds.
        epsilon: the epsilon spent over the run (the engine's accountant);
            None for settings without DP.
        epsilon_target: the target the noise was calibrated for.
        val_accuracy: the mean validation accuracy the choice was made on.
        params: the chosen hyper-parameters.
        candidates: configurations tried (per seed).
        seconds: wall time of tuning plus testing this row.
        round_seconds: mean wall time of one simulated round in the test runs.
        failed_rounds: rounds the round machine failed in the test runs
            (quorum, key holder refusal); 0 with full participation.
    """

    dataset: str
    devices: int
    setting: str
    model: str
    accuracy: float
    accuracy_std: float
    test_accuracies: tuple[float, ...]
    val_accuracy: float
    epsilon: float | None
    epsilon_target: float | None
    delta: float | None
    params: dict[str, Any] = field(default_factory=dict)
    candidates: int = 0
    failed_candidates: int = 0
    seconds: float = 0.0
    round_seconds: float | None = None
    failed_rounds: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (accuracies rounded to 4 decimals)."""
        out = asdict(self)
        out["accuracy"] = round(self.accuracy, 4)
        out["accuracy_std"] = round(self.accuracy_std, 4)
        out["val_accuracy"] = round(self.val_accuracy, 4)
        out["test_accuracies"] = [round(a, 4) for a in self.test_accuracies]
        out["seconds"] = round(self.seconds, 2)
        if self.round_seconds is not None:
            out["round_seconds"] = round(self.round_seconds, 4)
        if self.epsilon is not None:
            out["epsilon"] = round(self.epsilon, 4)
        return out


def full_plan() -> StudyPlan:
    """The study behind docs/results.md (about 15 minutes of CPU on one core)."""
    digits_servers: tuple[Server, ...] = (
        ("fedavg", 1.0),
        ("fedavg", 4.0),
        ("fedavg", 8.0),
        ("fedavgm", 1.0),
        ("fedadam", 0.2),
    )
    digits_dp_servers: tuple[Server, ...] = (("fedavg", 4.0), ("fedavg", 8.0), ("fedadam", 0.2))

    def digits(devices: int, quorum_eps: float | None) -> FleetPlan:
        return FleetPlan(
            dataset="digits",
            devices=devices,
            central_epochs=(10, 30, 60),
            central_lrs=(0.1, 0.3),
            local=((2, 0.1), (2, 0.3), (10, 0.1), (10, 0.3)),
            servers=digits_servers,
            max_rounds=30,
            clips=(0.3, 0.5, 1.0, 2.0),
            dp_rounds=(3, 5, 8),
            dp_clips=(0.3, 0.6),
            dp_servers=digits_dp_servers,
            selection_seeds=(0, 1),
            default_quorum_epsilon=quorum_eps,
            adaptive_epsilons=(1.0, 8.0),
            headline_epsilon=8.0,
            strategies_epsilon=8.0,
            prox_mus=(0.01, 0.1, 1.0),
            yogi_lrs=(0.03, 0.1, 0.3, 1.0),
            adagrad_lrs=(0.03, 0.1, 0.3, 1.0),
        )

    sensor_servers: tuple[Server, ...] = (("fedavg", 1.0), ("fedavg", 2.0), ("fedavg", 4.0))
    sensor = FleetPlan(
        dataset="sensor",
        devices=1000,
        central_epochs=(5, 20),
        central_lrs=(0.03, 0.3),
        local=((2, 0.3), (5, 0.3)),
        servers=sensor_servers,
        max_rounds=12,
        clips=(0.5, 1.5),
        dp_rounds=(4, 8),
        dp_clips=(0.5, 1.5),
        dp_servers=(("fedavg", 2.0), ("fedavg", 4.0)),
        selection_seeds=(0,),
        test_seeds=(10, 11),
        adaptive_epsilons=(1.0,),
        headline_epsilon=1.0,
    )
    return StudyPlan(fleets=(digits(20, None), digits(50, 8.0), sensor))


def quick_plan() -> StudyPlan:
    """A smoke run of every code path in a few seconds (figures meaningless)."""

    def tiny(dataset: str, devices: int, strategies: bool = False) -> FleetPlan:
        return FleetPlan(
            dataset=dataset,
            devices=devices,
            central_epochs=(1,),
            central_lrs=(0.1,),
            local=((1, 0.1),),
            servers=(("fedavg", 1.0), ("fedavg", 2.0)),
            max_rounds=2,
            clips=(1.0,),
            dp_rounds=(2,),
            dp_clips=(1.0,),
            dp_servers=(("fedavg", 2.0),),
            selection_seeds=(0,),
            test_seeds=(10, 11),
            default_quorum_epsilon=8.0,
            adaptive_epsilons=(8.0,),
            headline_epsilon=8.0,
            strategies_epsilon=8.0 if strategies else None,
            prox_mus=(0.1,),
            yogi_lrs=(0.1,),
            adagrad_lrs=(0.1,),
        )

    return StudyPlan(
        fleets=(tiny("digits", 6), tiny("digits", 10, strategies=True)),
        epsilons=(8.0,),
        crypto_round=False,
    )


#: The strategy rows' labels (``float_<label>`` and ``dp_<label>``).
STRATEGIES = ("fedprox", "fedyogi", "fedadagrad")


def strategy_knobs(fleet: FleetPlan, label: str) -> list[dict[str, Any]]:
    """The configurations a strategy row tries (SimConfig changes), from the fleet's grid."""
    if label == "fedprox":
        return [{"prox_mu": mu} for mu in fleet.prox_mus]
    lrs = {"fedyogi": fleet.yogi_lrs, "fedadagrad": fleet.adagrad_lrs}[label]
    return [{"server_opt": label, "server_lr": lr} for lr in lrs]


@dataclass(slots=True)
class _Candidate:
    config: SimConfig
    val: float
    order: int


def _pick(candidates: Sequence[_Candidate]) -> _Candidate:
    """Best mean validation accuracy; ties: fewer rounds, then grid order."""
    usable = [c for c in candidates if math.isfinite(c.val)]
    if not usable:
        raise RuntimeError("every candidate configuration failed")
    return min(usable, key=lambda c: (-round(c.val, 9), c.config.rounds, c.order))


class _Study:
    """Runs one plan; holds the data, the keys and the progress sink."""

    def __init__(self, plan: StudyPlan, keys: Keys, progress: Progress | None) -> None:
        self.plan = plan
        self.keys = keys
        self.say: Progress = progress or (lambda _msg: None)
        self.data: dict[str, Dataset] = {}

    def dataset(self, name: str) -> Dataset:
        if name not in self.data:
            # The split is fixed (seed 0); fleet seeds change partition, SGD order, noise.
            self.data[name] = load_dataset(name, seed=0)
        return self.data[name]

    def base(self, fleet: FleetPlan, **changes: Any) -> SimConfig:
        cfg = SimConfig(
            dataset=fleet.dataset,
            model=self.plan.model,
            hidden=self.plan.hidden,
            devices=fleet.devices,
            partition="dirichlet",
            alpha=self.plan.alpha,
            batch_size=self.plan.batch_size,
            delta=self.plan.delta,
            key_bits=self.plan.key_bits,
            min_clients=fleet.devices,
            crypto=False,
            eval_split="val",
        )
        return replace(cfg, **changes)

    def simulate(self, cfg: SimConfig) -> SimResult:
        return run(cfg, data=self.dataset(cfg.dataset), keys=self.keys)

    def curve(self, cfg: SimConfig, seeds: Sequence[int]) -> npt.NDArray[np.float64]:
        """Mean validation accuracy after each round over ``seeds`` (NaN on failure)."""
        curves = []
        for seed in seeds:
            try:
                res = self.simulate(replace(cfg, seed=seed))
            except _CANDIDATE_FAILURES:
                return np.full(cfg.rounds, np.nan)
            curves.append([r.accuracy for r in res.rounds])
        acc: npt.NDArray[np.float64] = np.asarray(curves, dtype=np.float64).mean(axis=0)
        acc[~np.isfinite(acc)] = np.nan
        return acc

    # -- settings ---------------------------------------------------------------

    def central(self, fleet: FleetPlan) -> Row:
        t0 = time.perf_counter()
        data = self.dataset(fleet.dataset)
        cands = []
        for order, (epochs, lr) in enumerate(
            (e, lr) for e in fleet.central_epochs for lr in fleet.central_lrs
        ):
            cfg = self.base(fleet, lr=lr, local_epochs=epochs, rounds=1)
            vals = [
                central_baseline(replace(cfg, seed=s), data=data, epochs=epochs)
                for s in fleet.selection_seeds
            ]
            cands.append(_Candidate(cfg, float(np.mean(vals)), order))
        best = _pick(cands)
        tests = [
            central_baseline(
                replace(best.config, seed=s, eval_split="test"),
                data=data,
                epochs=best.config.local_epochs,
            )
            for s in fleet.test_seeds
        ]
        params = {
            "epochs": best.config.local_epochs,
            "lr": best.config.lr,
            "batch_size": best.config.batch_size,
        }
        row = self._row(fleet, "central", best, tests, params, len(cands), 0, t0, None)
        self.say(
            f"{fleet.dataset}/{fleet.devices} central: val {best.val:.4f} "
            f"test {row.accuracy:.4f} ({row.seconds:.1f} s) {params}"
        )
        return row

    def _early_stopped(
        self, fleet: FleetPlan, configs: Sequence[SimConfig]
    ) -> tuple[_Candidate, int, int]:
        """Run each config for ``max_rounds``; every round is a candidate horizon."""
        cands: list[_Candidate] = []
        failed = 0
        for i, cfg in enumerate(configs):
            acc = self.curve(cfg, fleet.selection_seeds)
            failed += int(np.isnan(acc).all())
            for r, value in enumerate(acc, start=1):
                val = float(value) if np.isfinite(value) else -math.inf
                cands.append(_Candidate(replace(cfg, rounds=r), val, i))
        return _pick(cands), len(configs), failed

    def float_fedavg(self, fleet: FleetPlan) -> tuple[Row, SimConfig]:
        t0 = time.perf_counter()
        configs = [
            self.base(
                fleet,
                setting="float",
                rounds=fleet.max_rounds,
                local_epochs=epochs,
                lr=lr,
                server_opt=opt,
                server_lr=slr,
            )
            for epochs, lr in fleet.local
            for opt, slr in fleet.servers
        ]
        best, n, failed = self._early_stopped(fleet, configs)
        row = self._finish(fleet, "float", best, n, failed, t0)
        return row, best.config

    def he(self, fleet: FleetPlan, chosen_float: SimConfig) -> Row:
        t0 = time.perf_counter()
        configs = [
            replace(
                chosen_float,
                setting="he",
                rounds=fleet.max_rounds,
                clip=clip,
                server_opt=opt,
                server_lr=slr,
            )
            for clip in fleet.clips
            for opt, slr in fleet.servers
        ]
        best, n, failed = self._early_stopped(fleet, configs)
        return self._finish(fleet, "he", best, n, failed, t0)

    def he_float_config(self, fleet: FleetPlan, chosen_float: SimConfig) -> Row:
        """HE at the float winner's exact configuration; only the clip is chosen (on val).

        This isolates what clipping, quantization and encrypted summation cost
        from the noise of re-tuning the server optimizer and the horizon.
        """
        t0 = time.perf_counter()
        cands: list[_Candidate] = []
        for order, clip in enumerate(fleet.clips):
            cfg = replace(chosen_float, setting="he", clip=clip)
            final = float(self.curve(cfg, fleet.selection_seeds)[-1])
            cands.append(_Candidate(cfg, final if math.isfinite(final) else -math.inf, order))
        best = _pick(cands)
        failed = sum(1 for c in cands if not math.isfinite(c.val))
        return self._finish(fleet, "he_float_config", best, len(cands), failed, t0)

    def dp(self, fleet: FleetPlan, chosen_float: SimConfig, epsilon: float) -> Row:
        t0 = time.perf_counter()
        cands: list[_Candidate] = []
        failed = 0
        order = 0
        for rounds in fleet.dp_rounds:
            for clip in fleet.dp_clips:
                for opt, slr in fleet.dp_servers:
                    cfg = replace(
                        chosen_float,
                        setting="dp",
                        epsilon=epsilon,
                        rounds=rounds,
                        clip=clip,
                        server_opt=opt,
                        server_lr=slr,
                    )
                    final = float(self.curve(cfg, fleet.selection_seeds)[-1])
                    failed += int(not math.isfinite(final))
                    val = final if math.isfinite(final) else -math.inf
                    cands.append(_Candidate(cfg, val, order))
                    order += 1
        best = _pick(cands)
        return self._finish(fleet, "dp", best, len(cands), failed, t0)

    def dp_adaptive(self, fleet: FleetPlan, chosen_float: SimConfig, epsilon: float) -> Row:
        """``dp`` with adaptive clipping: the grid has no clip (rounds and server only)."""
        t0 = time.perf_counter()
        cands: list[_Candidate] = []
        failed = 0
        for order, (rounds, (opt, slr)) in enumerate(
            (r, s) for r in fleet.dp_rounds for s in fleet.dp_servers
        ):
            cfg = replace(
                chosen_float,
                setting="dp_adaptive",
                epsilon=epsilon,
                rounds=rounds,
                server_opt=opt,
                server_lr=slr,
                adaptive_quantile=ADAPTIVE["quantile"],
                adaptive_lr=ADAPTIVE["lr"],
                adaptive_initial_clip=ADAPTIVE["initial_clip"],
            )
            final = float(self.curve(cfg, fleet.selection_seeds)[-1])
            failed += int(not math.isfinite(final))
            cands.append(_Candidate(cfg, final if math.isfinite(final) else -math.inf, order))
        best = _pick(cands)
        return self._finish(fleet, "dp_adaptive", best, len(cands), failed, t0)

    def federated_evaluation(self, fleet: FleetPlan, label: str, cfg: SimConfig) -> dict[str, Any]:
        """One test-seed run of ``cfg`` with federated evaluation: both figures per round.

        Evaluation every round at noise multiplier 5 when the budget allows
        it; otherwise (an epsilon too small for that) the first of: every
        round at 10, 20, 40, then only the last round at 5, 10, 20, 40, that
        the calibration can meet. The choice depends on the privacy budget
        only, never on accuracy.
        """
        one = replace(cfg, eval_split="test", seed=fleet.test_seeds[0])
        options = [(1, z) for z in (5.0, 10.0, 20.0, 40.0)]
        options += [(one.rounds, z) for z in (5.0, 10.0, 20.0, 40.0)]
        res = None
        for every, z in options:
            one = replace(one, evaluate_every=every, eval_noise=z)
            try:
                res = self.simulate(one)
                break
            except CalibrationError:
                if not one.setting.startswith("dp"):
                    raise
        if res is None:
            return {
                "dataset": fleet.dataset,
                "devices": fleet.devices,
                "setting": label,
                "skipped": "no evaluation schedule fits the epsilon",
            }
        return {
            "dataset": fleet.dataset,
            "devices": fleet.devices,
            "setting": label,
            "epsilon_target": one.epsilon if one.setting.startswith("dp") else None,
            "epsilon": round(res.rounds[-1].epsilon, 4) if res.rounds else None,
            "eval_noise": one.eval_noise,
            "evaluate_every": one.evaluate_every,
            "eval_max_examples": one.eval_max_examples,
            "rounds": [
                {
                    "round": r.round,
                    # the model the devices received this round is the one the
                    # previous round produced: pair it with that test figure
                    "test_accuracy_of_received_model": (
                        None if i == 0 else round(res.rounds[i - 1].accuracy, 4)
                    ),
                    "federated_accuracy": (
                        None if r.fed_accuracy is None else round(r.fed_accuracy, 4)
                    ),
                    "federated_accuracy_unnoised": (
                        None if r.fed_plain_accuracy is None else round(r.fed_plain_accuracy, 4)
                    ),
                    "federated_loss": None if r.fed_loss is None else round(r.fed_loss, 4),
                    "examples": r.fed_plain_examples,
                    "test_accuracy_after_round": round(r.accuracy, 4),
                    "clip": None if r.clip is None else round(r.clip, 4),
                }
                for i, r in enumerate(res.rounds)
            ],
        }

    def default_quorum(self, fleet: FleetPlan, dp_row_config: SimConfig) -> Row:
        """The ``dp`` winner re-run with the engine's default quorum (no re-tuning)."""
        t0 = time.perf_counter()
        cfg = replace(dp_row_config, min_clients=None)
        val = float(self.curve(cfg, fleet.selection_seeds)[-1])
        cand = _Candidate(cfg, val if math.isfinite(val) else -math.inf, 0)
        return self._finish(fleet, "dp_default_quorum", cand, 1, 0, t0)

    def strategies(
        self, fleet: FleetPlan, chosen_float: SimConfig, dp_winner: SimConfig
    ) -> list[Row]:
        """FedProx, FedYogi and FedAdagrad rows, float and DP (see the module docstring).

        Args:
            fleet: the grid (``prox_mus``, ``yogi_lrs``, ``adagrad_lrs``, ``dp_rounds``).
            chosen_float: the ``float`` winner (its local training is kept).
            dp_winner: the ``dp`` winner at ``fleet.strategies_epsilon`` (its
                clip, and FedProx's server optimizer, are kept).
        """
        rows: list[Row] = []
        for label in STRATEGIES:
            if strategy_knobs(fleet, label):
                rows.append(self.strategy_float(fleet, label, chosen_float))
                rows.append(self.strategy_dp(fleet, label, chosen_float, dp_winner))
        return rows

    def strategy_float(self, fleet: FleetPlan, label: str, chosen_float: SimConfig) -> Row:
        """``float_<label>``: the float winner with the strategy's knob, early-stopped."""
        t0 = time.perf_counter()
        configs = [
            replace(chosen_float, rounds=fleet.max_rounds, **knob)
            for knob in strategy_knobs(fleet, label)
        ]
        best, n, failed = self._early_stopped(fleet, configs)
        return self._finish(fleet, f"float_{label}", best, n, failed, t0)

    def strategy_dp(
        self, fleet: FleetPlan, label: str, chosen_float: SimConfig, dp_winner: SimConfig
    ) -> Row:
        """``dp_<label>``: the ``dp`` winner's clip, the knob and the rounds chosen on val."""
        t0 = time.perf_counter()
        cands: list[_Candidate] = []
        failed = 0
        server = {"server_opt": dp_winner.server_opt, "server_lr": dp_winner.server_lr}
        for rounds in fleet.dp_rounds:
            for knob in strategy_knobs(fleet, label):
                cfg = replace(
                    chosen_float,
                    setting="dp",
                    epsilon=dp_winner.epsilon,
                    rounds=rounds,
                    clip=dp_winner.clip,
                    **{**server, **knob},
                )
                final = float(self.curve(cfg, fleet.selection_seeds)[-1])
                failed += int(not math.isfinite(final))
                val = final if math.isfinite(final) else -math.inf
                cands.append(_Candidate(cfg, val, len(cands)))
        best = _pick(cands)
        return self._finish(fleet, f"dp_{label}", best, len(cands), failed, t0)

    # -- test runs and rows -----------------------------------------------------

    def _finish(
        self,
        fleet: FleetPlan,
        setting: str,
        best: _Candidate,
        candidates: int,
        failed: int,
        t0: float,
    ) -> Row:
        tests: list[float] = []
        spent: list[float] = []
        round_times: list[float] = []
        failed_rounds = 0
        final_clips: list[float] = []
        for seed in fleet.test_seeds:
            res = self.simulate(replace(best.config, seed=seed, eval_split="test"))
            tests.append(res.final_accuracy)
            final_clips.append(res.rounds[-1].clip or 0.0)
            spent.append(res.rounds[-1].epsilon)
            round_times.extend(r.seconds for r in res.rounds)
            failed_rounds += res.failed_rounds
        cfg = best.config
        params: dict[str, Any] = {
            "rounds": cfg.rounds,
            "local_epochs": cfg.local_epochs,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "server_opt": cfg.server_opt,
            "server_lr": cfg.server_lr,
        }
        if setting == "dp_adaptive":
            params["clip"] = "adaptive"
            params["adaptive"] = dict(ADAPTIVE)
            params["final_clips"] = [round(c, 4) for c in final_clips]
            params["value_bits"] = cfg.value_bits
        elif not setting.startswith("float"):
            params["clip"] = cfg.clip
            params["value_bits"] = cfg.value_bits
        if setting.startswith("dp"):
            params["min_clients"] = cfg.quorum
        if cfg.prox_mu > 0:
            params["prox_mu"] = cfg.prox_mu
        eps = max(spent) if setting.startswith("dp") else None
        row = replace(
            self._row(
                fleet, setting, best, tests, params, candidates, failed, t0, eps, round_times
            ),
            failed_rounds=failed_rounds,
        )
        self.say(
            f"{fleet.dataset}/{fleet.devices} {setting}"
            f"{'' if eps is None else f' eps {cfg.epsilon:g}'}: val {best.val:.4f} "
            f"test {row.accuracy:.4f} ({row.seconds:.1f} s) {params}"
        )
        return row

    def _row(
        self,
        fleet: FleetPlan,
        setting: str,
        best: _Candidate,
        tests: Sequence[float],
        params: dict[str, Any],
        candidates: int,
        failed: int,
        t0: float,
        epsilon: float | None,
        round_times: Sequence[float] = (),
    ) -> Row:
        is_dp = epsilon is not None
        return Row(
            dataset=fleet.dataset,
            devices=fleet.devices,
            setting=setting,
            model=self.plan.model,
            accuracy=float(np.mean(tests)),
            accuracy_std=float(np.std(tests)),
            test_accuracies=tuple(float(t) for t in tests),
            val_accuracy=best.val,
            epsilon=epsilon,
            epsilon_target=best.config.epsilon if is_dp else None,
            delta=best.config.delta if is_dp else None,
            params=params,
            candidates=candidates,
            failed_candidates=failed,
            seconds=time.perf_counter() - t0,
            round_seconds=float(np.mean(round_times)) if round_times else None,
        )

    def crypto_round(self, fleet: FleetPlan, cfg: SimConfig) -> dict[str, Any]:
        """Time one round of ``cfg``'s fleet with real Paillier encryption, sum, decryption."""
        one = replace(cfg, rounds=1, crypto=True, eval_split="val", seed=fleet.test_seeds[0])
        res = self.simulate(one)
        return {
            "devices": fleet.devices,
            "dataset": fleet.dataset,
            "setting": one.setting,
            "crypto_round_seconds": round(res.rounds[0].seconds, 3),
            "bytes_up_per_device": res.rounds[0].bytes_up // max(res.rounds[0].contributors, 1),
        }


def target_checks(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """The issue's accuracy targets, checked on mean test accuracy (in points).

    * HE-only within 0.5 points of float FedAvg (HE above float counts as met),
      both for ``he`` (tuned on its own) and ``he_float_config``;
    * float FedAvg within 3 points of central training;
    * digits, 50 devices, epsilon 8: within 5 points of float FedAvg;
    * sensor, 1,000 devices, epsilon 1: within 3 points of float FedAvg.
    """
    table = {(r.dataset, r.devices, r.setting, r.epsilon_target): r for r in rows}
    fleets = sorted({(r.dataset, r.devices) for r in rows}, key=lambda f: (f[1], f[0]))
    out: dict[str, dict[str, Any]] = {}

    def gap(a: Row, b: Row) -> float:
        return round(100.0 * (a.accuracy - b.accuracy), 2)

    for ds, n in fleets:
        fl = table.get((ds, n, "float", None))
        he = table.get((ds, n, "he", None))
        central = table.get((ds, n, "central", None))
        if fl is not None and he is not None:
            g = gap(he, fl)
            out[f"he_vs_float_{ds}_{n}"] = {
                "value": g,
                "target": ">= -0.5 points (HE-only, tuned on its own, vs float FedAvg, test)",
                "met": g >= -0.5,
            }
        he_same = table.get((ds, n, "he_float_config", None))
        if fl is not None and he_same is not None:
            g = gap(he_same, fl)
            out[f"he_float_config_vs_float_{ds}_{n}"] = {
                "value": g,
                "target": ">= -0.5 points (HE-only at the float winner's configuration, test)",
                "met": g >= -0.5,
            }
        if fl is not None and central is not None:
            g = gap(fl, central)
            out[f"float_vs_central_{ds}_{n}"] = {
                "value": g,
                "target": ">= -3 points (float FedAvg vs central, test)",
                "met": g >= -3.0,
            }
    for ds, n, eps in (("digits", 50, 8.0), ("sensor", 1000, 1.0)):
        dp = table.get((ds, n, "dp", eps))
        ad = table.get((ds, n, "dp_adaptive", eps))
        if dp is not None and ad is not None:
            g = gap(ad, dp)
            out[f"dp_adaptive_eps{eps:g}_vs_dp_{ds}_{n}"] = {
                "value": g,
                "target": f">= -1 point (adaptive clip vs the best hand-tuned clip, eps {eps:g})",
                "met": g >= -1.0,
            }
    for ds, n, eps, limit in (("digits", 50, 8.0, 5.0), ("sensor", 1000, 1.0, 3.0)):
        fl = table.get((ds, n, "float", None))
        dp = table.get((ds, n, "dp", eps))
        if fl is not None and dp is not None:
            g = gap(dp, fl)
            out[f"dp_eps{eps:g}_vs_float_{ds}_{n}"] = {
                "value": g,
                "target": f">= -{limit:g} points (DP eps {eps:g} vs float FedAvg, test)",
                "met": g >= -limit,
            }
    return out


def run_study(
    plan: StudyPlan,
    *,
    keys: Keys | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every fleet of ``plan`` and return the JSON-ready results.

    Args:
        plan: fleets, grids and privacy targets.
        keys: a key-holder committee to reuse (else a 2-of-3 ceremony; with
            crypto off only its size matters, through the packing).
        progress: called with one line per finished row.

    Returns:
        ``rows`` (one per dataset, devices, setting and epsilon),
        ``targets``, ``round_seconds`` of the largest fleet, the plan and the
        total seconds.
    """
    started = time.perf_counter()
    study = _Study(plan, keys or InMemoryCommittee(FEDERATION, bits=plan.key_bits), progress)
    rows: list[Row] = []
    federated: list[dict[str, Any]] = []
    dp_configs: dict[tuple[str, int, float], SimConfig] = {}
    for fleet in plan.fleets:
        rows.append(study.central(fleet))
        float_row, chosen_float = study.float_fedavg(fleet)
        rows.append(float_row)
        rows.append(study.he(fleet, chosen_float))
        rows.append(study.he_float_config(fleet, chosen_float))
        for eps in plan.epsilons:
            row = study.dp(fleet, chosen_float, eps)
            rows.append(row)
            dp_configs[(fleet.dataset, fleet.devices, eps)] = _config_of(row, chosen_float)
        q_eps = fleet.default_quorum_epsilon
        if q_eps is not None and (fleet.dataset, fleet.devices, q_eps) in dp_configs:
            cfg = dp_configs[(fleet.dataset, fleet.devices, q_eps)]
            rows.append(study.default_quorum(fleet, cfg))
        adaptive_rows, evaluations = _learning_rows(study, fleet, chosen_float, rows, dp_configs)
        rows += adaptive_rows
        federated += evaluations
        s_eps = fleet.strategies_epsilon
        if s_eps is not None and (fleet.dataset, fleet.devices, s_eps) in dp_configs:
            cfg = dp_configs[(fleet.dataset, fleet.devices, s_eps)]
            rows.extend(study.strategies(fleet, chosen_float, cfg))
    largest = max(plan.fleets, key=lambda f: f.devices)
    timing: dict[str, Any] = {"devices": largest.devices, "dataset": largest.dataset}
    for r in rows:
        if (r.dataset, r.devices) == (largest.dataset, largest.devices) and r.round_seconds:
            key = r.setting if r.epsilon_target is None else f"{r.setting}_eps{r.epsilon_target:g}"
            timing[f"{key}_round_seconds"] = round(r.round_seconds, 3)
    if plan.crypto_round:
        eps_min = min(plan.epsilons)
        cfg = dp_configs[(largest.dataset, largest.devices, eps_min)]
        timing.update(study.crypto_round(largest, cfg))
    return {
        "rows": [r.to_json() for r in rows],
        "federated_evaluation": federated,
        "targets": target_checks(rows),
        "round_timing": timing,
        "plan": _plan_json(plan),
        "engine": {
            "round_logic": "aggregator.rounds.RoundMachine + aggregator.keyholder.KeyHolder",
            "randomness": "os-csprng",
            "crypto": "unblinded (crypto=False fast path); the crypto round: paillier",
            "epsilon": "largest charge of any device's privacy ledger",
        },
        "study_seconds": round(time.perf_counter() - started, 1),
    }


def _learning_rows(
    study: _Study,
    fleet: FleetPlan,
    chosen_float: SimConfig,
    rows: Sequence[Row],
    dp_configs: dict[tuple[str, int, float], SimConfig],
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The ``dp_adaptive`` rows of a fleet and its federated-evaluation runs."""
    out: list[Row] = []
    adaptive: dict[float, Row] = {}
    for eps in fleet.adaptive_epsilons:
        row = study.dp_adaptive(fleet, chosen_float, eps)
        adaptive[eps] = row
        out.append(row)
    evaluations: list[dict[str, Any]] = []
    he = next(
        (
            r
            for r in rows
            if r.setting == "he" and r.dataset == fleet.dataset and r.devices == fleet.devices
        ),
        None,
    )
    if he is not None:
        cfg = replace(
            chosen_float,
            setting="he",
            rounds=int(he.params["rounds"]),
            clip=float(he.params["clip"]),
            server_opt=str(he.params["server_opt"]),
            server_lr=float(he.params["server_lr"]),
        )
        evaluations.append(study.federated_evaluation(fleet, "he", cfg))
    headline = fleet.headline_epsilon
    if headline is not None and (fleet.dataset, fleet.devices, headline) in dp_configs:
        key = (fleet.dataset, fleet.devices, headline)
        evaluations.append(study.federated_evaluation(fleet, "dp", dp_configs[key]))
    if headline is not None and headline in adaptive:
        eps = headline
        p = adaptive[eps].params
        cfg = replace(
            chosen_float,
            setting="dp_adaptive",
            epsilon=eps,
            rounds=int(p["rounds"]),
            server_opt=str(p["server_opt"]),
            server_lr=float(p["server_lr"]),
            adaptive_quantile=ADAPTIVE["quantile"],
            adaptive_lr=ADAPTIVE["lr"],
            adaptive_initial_clip=ADAPTIVE["initial_clip"],
        )
        evaluations.append(study.federated_evaluation(fleet, "dp_adaptive", cfg))
    return out, evaluations


def extend_study(
    published: dict[str, Any],
    plan: StudyPlan,
    *,
    keys: Keys | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Add the ``dp_adaptive`` rows and the federated-evaluation runs to a published study.

    The staged tuning's earlier stages are read from ``published`` instead
    of re-run (the float winner's local training, the ``he`` and ``dp``
    winners): what :func:`run_study` would have chosen from the same rows.
    Everything new is tuned and tested exactly as :func:`run_study` does.
    """
    started = time.perf_counter()
    study = _Study(plan, keys or InMemoryCommittee(FEDERATION, bits=plan.key_bits), progress)
    old = [r for r in published["rows"] if r["setting"] != "dp_adaptive"]
    rows = [_row_of(r) for r in old]
    new_rows: list[Row] = []
    federated: list[dict[str, Any]] = []
    for fleet in plan.fleets:
        mine = [r for r in rows if (r.dataset, r.devices) == (fleet.dataset, fleet.devices)]
        fl = next(r for r in mine if r.setting == "float")
        chosen_float = study.base(
            fleet,
            setting="float",
            rounds=int(fl.params["rounds"]),
            local_epochs=int(fl.params["local_epochs"]),
            lr=float(fl.params["lr"]),
            server_opt=str(fl.params["server_opt"]),
            server_lr=float(fl.params["server_lr"]),
        )
        dp_configs = {
            (r.dataset, r.devices, float(r.epsilon_target or 0)): _config_of(r, chosen_float)
            for r in mine
            if r.setting == "dp"
        }
        adaptive_rows, evaluations = _learning_rows(study, fleet, chosen_float, mine, dp_configs)
        new_rows += adaptive_rows
        federated += evaluations
    ordered: list[dict[str, Any]] = []
    for r in old:  # each fleet's dp_adaptive rows right after its dp rows
        ordered.append(r)
        last_dp = [
            o
            for o in old
            if (o["dataset"], o["devices"]) == (r["dataset"], r["devices"]) and o["setting"] == "dp"
        ][-1:]
        if last_dp and r is last_dp[0]:
            ordered += [
                n.to_json()
                for n in new_rows
                if (n.dataset, n.devices) == (r["dataset"], r["devices"])
            ]
    out = dict(published)
    out["rows"] = ordered
    out["federated_evaluation"] = federated
    out["targets"] = target_checks([_row_of(r) for r in ordered])
    out["plan"] = _plan_json(plan)
    out["extension_seconds"] = round(time.perf_counter() - started, 1)
    return out


def _row_of(data: dict[str, Any]) -> Row:
    fields = {k: data[k] for k in Row.__dataclass_fields__ if k in data}
    fields["test_accuracies"] = tuple(fields.get("test_accuracies", ()))
    return Row(**fields)


def _config_of(row: Row, chosen_float: SimConfig) -> SimConfig:
    p = row.params
    return replace(
        chosen_float,
        setting="dp",
        epsilon=float(row.epsilon_target or 0.0),
        rounds=int(p["rounds"]),
        clip=float(p["clip"]),
        server_opt=str(p["server_opt"]),
        server_lr=float(p["server_lr"]),
    )


def _plan_json(plan: StudyPlan) -> dict[str, Any]:
    out = asdict(plan)
    out["fleets"] = [asdict(f) for f in plan.fleets]
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Render JSON rows as a Markdown table (for docs/results.md)."""
    head = (
        "| dataset | devices | setting | epsilon (target) | test acc. (mean of seeds) "
        "| val acc. | rounds | local E / lr | server | clip |\n"
        "|---|---:|---|---|---:|---:|---:|---|---|---:|"
    )
    lines = [head]
    for r in rows:
        p = r["params"]
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g} ({r['epsilon_target']:g})"
        if r["setting"] == "central":
            rounds = f"{p['epochs']} epochs"
            local = f"lr {p['lr']:g}"
            server = "-"
        else:
            rounds = str(p["rounds"])
            local = f"{p['local_epochs']} / {p['lr']:g}"
            if "prox_mu" in p:
                local += f" (FedProx mu {p['prox_mu']:g})"
            server = f"{p['server_opt']} {p['server_lr']:g}"
        if p.get("clip") == "adaptive":
            clip = "adaptive (" + ", ".join(f"{c:.2g}" for c in p.get("final_clips", [])) + ")"
        else:
            clip = f"{p['clip']:g}" if "clip" in p else "-"
        acc = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
        lines.append(
            f"| {r['dataset']} | {r['devices']} | {r['setting']} | {eps} | {acc} "
            f"| {100 * r['val_accuracy']:.2f} | {rounds} | {local} | {server} | {clip} |"
        )
    return "\n".join(lines)
