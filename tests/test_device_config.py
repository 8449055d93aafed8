"""device.toml: one typed dataclass per table, unknown keys refused, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.agent.config import load_device_config
from edge_sdk.errors import ConfigError

GOOD = """\
[device]
id = "pi-17"
federation = "clinic"
state_dir = "/var/lib/edgefl"

[broker]
url = "mqtts://broker.example:8883"
ca_file = "/etc/edgefl/ca.pem"
keepalive = 30

[keys]
public_key = "/etc/edgefl/paillier.pub.json"

[privacy]
budget_epsilon = 4
delta = 1e-6

[training]
model = "softmax"
features = 64
classes = 10
"""


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> object:
    path = tmp_path / "device.toml"
    path.write_text(text)
    return load_device_config(path, env=env or {})


def test_the_example_parses_with_types(tmp_path: Path) -> None:
    cfg = load_device_config(Path(__file__).parent.parent / "examples" / "device.toml", env={})
    assert cfg.device_id and cfg.broker["url"]
    cfg2 = _load(tmp_path, GOOD)
    assert cfg2.budget_epsilon == 4.0 and isinstance(cfg2.budget_epsilon, float)  # type: ignore[attr-defined]
    assert cfg2.broker["keepalive"] == 30 and "protocol" not in cfg2.broker  # type: ignore[attr-defined]


def test_environment_overrides_apply_and_are_checked(tmp_path: Path) -> None:
    cfg = _load(tmp_path, GOOD, {"EDGEFL_DEVICE_ID": "pi-18", "EDGEFL_PRIVACY_DELTA": "1e-7"})
    assert cfg.device_id == "pi-18" and cfg.delta == 1e-7  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"\[privacy\] budget_epsilon must be a number"):
        _load(tmp_path, GOOD, {"EDGEFL_PRIVACY_BUDGET_EPSILON": "lots"})


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('id = "pi-17"\n', "", r"\[device\] needs id \(or EDGEFL_DEVICE_ID\)"),
        ('id = "pi-17"', 'id = "pi/17"', r"id and federation must match"),
        ("keepalive = 30", "keep_alive = 30", r"unknown \[broker\] settings: keep_alive"),
        ("keepalive = 30", 'keepalive = "30"', r"\[broker\] keepalive must be an integer"),
        ("keepalive = 30", "keepalive = 0", r"\[broker\]"),
        ("budget_epsilon = 4", "budget_epsilon = -1", r"budget_epsilon > 0"),
        ("budget_epsilon = 4", "budget_epsilon = true", r"must be a number"),
        ("features = 64", "feature = 64", r"unknown \[training\] settings: feature"),
        ("[privacy]", "[privcy]", r"unknown config section \[privcy\]"),
        ('url = "mqtts://broker.example:8883"\n', "", r"\[broker\] needs url"),
    ],
)
def test_every_device_table_refuses_unknown_keys_and_bad_values(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in GOOD, old
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, GOOD.replace(old, new, 1))


def test_a_user_factory_gets_its_own_keys(tmp_path: Path) -> None:
    text = GOOD.replace('model = "softmax"', 'model = "mypkg.models:make"\nhidden = 32')
    cfg = _load(tmp_path, text)
    assert cfg.training["hidden"] == 32  # type: ignore[attr-defined]
