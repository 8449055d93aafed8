"""Typed configuration: one dataclass per TOML table, unknown keys refused everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import EXAMPLE, load_config
from aggregator.keyholder_config import KEYHOLDER_TEMPLATE, load_keyholder_config
from edge_sdk.errors import ConfigError


def test_a_typo_in_the_train_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(EXAMPLE.replace("epochs = 1\n", "epochs = 2\n"))
    assert load_config(path).aggregator.train["epochs"] == 2
    path.write_text(EXAMPLE.replace("epochs = 1\n", "epoch = 2\n"))
    with pytest.raises(ConfigError, match=r"unknown \[aggregator\.train\] settings: epoch"):
        load_config(path)
    path.write_text(EXAMPLE.replace("lr = 0.05", "lr = -1.0"))
    with pytest.raises(ConfigError, match=r"aggregator\.train"):
        load_config(path)


def test_the_example_parses_into_typed_tables(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(EXAMPLE)
    cfg = load_config(path)
    assert cfg.aggregator.dimension == 7850 and cfg.aggregator.round_duration_s == 300.0
    assert isinstance(cfg.aggregator.round_duration_s, float)  # an int in TOML, a float here
    assert cfg.aggregator.cohort == () and cfg.committee.mode == "remote"
    assert cfg.broker["client_id"] == "aggregator" and cfg.broker["manual_ack"] is True


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("tick_s = 0.2", "tick_z = 0.2", r"unknown \[aggregator\] settings: tick_z \(known: "),
        ("dimension = 7850", 'dimension = "7850"', r"\[aggregator\] dimension must be an integer"),
        ("min_clients = 10 ", "min_clients = 0 ", r"min_clients must be >= 1"),
        ("cohort = []", "cohort = [1, 2]", r"\[aggregator\] cohort must be an array of strings"),
        ('mode = "remote"', 'mode = "local"', r"mode must be one of"),
        ('mode = "remote"', 'mode = "remote"\nmember = []', r"unknown \[committee\] settings"),
        ("manual_ack = true", "manual_ack = true\nkeep_alive = 5", r"\[broker\]"),
        ("[broker]", "[transport]", r"\[transport\] table is now called \[broker\]"),
        ('name = "fedavg"', 'name = "fedsgd"', r"unknown server optimizer"),
        ('federation = "demo"\n', "", r"\[aggregator\] needs federation"),
        ("[committee]", "[comittee]", r"unknown tables \['comittee'\]"),
    ],
)
def test_every_aggregator_table_refuses_unknown_keys_and_bad_values(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    assert old in EXAMPLE, old
    path = tmp_path / "aggregator.toml"
    path.write_text(EXAMPLE.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def _keyholder_text() -> str:
    return KEYHOLDER_TEMPLATE.format(
        holder_id="keyholder-1",
        federation="demo",
        registry="../../registry.json",
        min_clients=3,
        broker_url="mqtt://127.0.0.1:1883",
        protocol=5,
    )


def test_the_keyholder_template_parses_into_typed_tables(tmp_path: Path) -> None:
    path = tmp_path / "keyholder.toml"
    path.write_text(_keyholder_text())
    cfg = load_keyholder_config(path)
    assert cfg.keyholder.min_clients == 3 and cfg.keyholder.witness_grace_s == 60.0
    assert cfg.broker["client_id"] == "keyholder-1" and cfg.broker["clean_start"] is False


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("witness_grace_s = 60", "witness_grace = 60", r"unknown \[keyholder\] settings"),
        ("min_clients = 3", 'min_clients = "3"', r"min_clients must be an integer"),
        ("[broker]", "[transport]", r"now called \[broker\]"),
        ("manual_ack = true", "manual_ack = 1", r"\[broker\]"),
    ],
)
def test_every_keyholder_table_refuses_unknown_keys_and_bad_values(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = _keyholder_text()
    assert old in text, old
    path = tmp_path / "keyholder.toml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message):
        load_keyholder_config(path)


def test_the_table_defaults_are_the_services() -> None:
    from aggregator.config import AggregatorTable
    from aggregator.service import DEFAULT_COMMIT_BATCH, DEFAULT_COMMIT_MAX_MS

    table = AggregatorTable(federation="f", dimension=1, min_clients=1)
    assert (table.commit_batch, table.commit_max_ms) == (
        DEFAULT_COMMIT_BATCH,
        DEFAULT_COMMIT_MAX_MS,
    )


def test_workers_get_their_own_session_and_may_get_their_own_broker_user(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    text = EXAMPLE.replace("workers = 1 ", "workers = 2 ", 1)
    path.write_text(text + '\n[worker_broker.1]\nusername = "aggregator-worker-1"\n')
    cfg = load_config(path)
    assert cfg.aggregator.workers == 2
    assert cfg.broker_for(None)["client_id"] == "aggregator"
    assert cfg.broker_for(0)["client_id"] == "aggregator-worker-0"
    one = cfg.broker_for(1)
    assert one["client_id"] == "aggregator-worker-1" and one["username"] == "aggregator-worker-1"
    assert one["url"] == cfg.broker["url"]
    path.write_text(text + '\n[worker_broker.2]\nusername = "x"\n')
    with pytest.raises(ConfigError, match=r"worker index 0\.\.1"):
        load_config(path)
    path.write_text(text + "\n[worker_broker.0]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(path)
    path.write_text(EXAMPLE.replace("workers = 1 ", "workers = 0 ", 1))
    with pytest.raises(ConfigError, match="workers"):
        load_config(path)


def test_serve_worker_needs_workers_and_an_index_in_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_sdk.cli import main

    path = tmp_path / "aggregator.toml"
    path.write_text(EXAMPLE)
    assert main(["aggregator", "serve", "--config", str(path), "--worker", "0"]) == 2
    assert "workers >= 2" in capsys.readouterr().err
    path.write_text(EXAMPLE.replace("workers = 1 ", "workers = 2 ", 1))
    assert main(["aggregator", "serve", "--config", str(path), "--worker", "2"]) == 2
    assert "0..1" in capsys.readouterr().err


def test_serve_with_a_missing_key_file_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file the configuration names that cannot be read exits 2 (usage), naming it."""
    from edge_sdk.cli import main

    path = tmp_path / "aggregator.toml"
    path.write_text(EXAMPLE)
    assert main(["aggregator", "serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "public key file" in err and "paillier_public.json" in err
