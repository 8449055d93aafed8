"""On-device differential privacy: clipping, exact discrete noise, accounting, ledger.

A device turns its model delta into a private integer update with::

    clipped, _ = clip_l2(delta, noise.clip)
    ints = quantize(clipped * noise.scale)      # crypto codec; re-round until
    assert within_norm_bound(ints, noise)       # within the bound (KLS 2021)
    ledger.record(round_key, cost_of(noise), idempotency_key=...)  # durable first
    noised = add_noise(ints, noise)             # exact discrete Gaussian

See docs/privacy.md for what is protected, the two modes and how to choose
parameters.
"""

from edge_sdk.errors import BudgetExhaustedError, LedgerCorruptedError, PrivacyError
from edge_sdk.privacy._clip import NonFiniteUpdateError, clip_l2
from edge_sdk.privacy._sampler import sigma2_on_grid
from edge_sdk.privacy._spec import (
    DEFAULT_ROUNDING_BETA,
    DPPolicy,
    Mode,
    NoiseSpec,
    rounded_norm_bound_sq,
)
from edge_sdk.privacy.accounting import (
    PrivacyCost,
    PrivacyReport,
    RdpCurve,
    compose_costs,
    compose_epsilon,
    cost_of,
    epsilon_from_rdp,
    epsilon_spent,
    extra_slot_cost,
    pld_epsilon,
    privacy_report,
    round_cost,
)
from edge_sdk.privacy.calibration import CalibrationError, calibrate
from edge_sdk.privacy.ledger import (
    LedgerEntry,
    PrivacyLedger,
    RoundAlreadySpentError,
    update_digest,
)
from edge_sdk.privacy.noise import (
    NormBoundExceededError,
    add_noise,
    sample_discrete_gaussian,
    squared_norm,
    within_norm_bound,
)

__all__ = [
    "DEFAULT_ROUNDING_BETA",
    "BudgetExhaustedError",
    "CalibrationError",
    "DPPolicy",
    "LedgerCorruptedError",
    "LedgerEntry",
    "Mode",
    "NoiseSpec",
    "NonFiniteUpdateError",
    "NormBoundExceededError",
    "PrivacyCost",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyReport",
    "RdpCurve",
    "RoundAlreadySpentError",
    "add_noise",
    "calibrate",
    "clip_l2",
    "compose_costs",
    "compose_epsilon",
    "cost_of",
    "epsilon_from_rdp",
    "epsilon_spent",
    "extra_slot_cost",
    "pld_epsilon",
    "privacy_report",
    "round_cost",
    "rounded_norm_bound_sq",
    "sample_discrete_gaussian",
    "sigma2_on_grid",
    "squared_norm",
    "update_digest",
    "within_norm_bound",
]
