"""`edgefl bench crypto --quick` runs and writes every promised figure (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from edge_sdk.cli import main

KEYS = [
    "naive_encrypt_ms_per_param",
    "packed_encrypt_ms_per_param",
    "pooled_encrypt_ms_per_param",
    "bytes_per_param",
    "sum_ms_per_ciphertext",
    "raw_mulmod_ms",
    "decrypt_ms_per_param",
]


def test_bench_crypto_quick_writes_all_figures(tmp_path: Path) -> None:
    out = tmp_path / "crypto.json"
    assert main(["bench", "crypto", "--json", str(out), "--quick"]) == 0
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert figures[key] > 0, key
    assert figures["key_bits"] == 2048 and figures["slots_per_plaintext"] == 78
    # Size is deterministic: 512-byte ciphertexts over 78 slots.
    assert figures["bytes_per_param"] == 512 / 78
    assert figures["targets"]["bytes_per_param"]["met"] is True
    assert set(figures["targets"]) >= {
        "packed_speedup_vs_naive",
        "pooled_speedup_vs_naive",
        "sum_efficiency_vs_raw_mulmod",
    }
