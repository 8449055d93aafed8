"""Aggregator benchmark: ingest, additions vs raw mulmod, 2-core scaling, round time.

Targets (issue 7): additions per core >= 70% of the raw ``a * b mod n^2``
rate measured in the same run; >= 1.8x on 2 cores for a large sum; one round
of 100 devices with a 50k-parameter model (ingest, validate, persist, close,
decrypt, optimizer) in <= 10 s.

What is synthetic: encrypting a 50k-parameter update costs seconds, so ONE
real update is produced by the device pipeline (pack + encrypt); every other
device's ciphertext vector is a rotation of that one (every element is a
genuine ciphertext, so validation and summation do the same work), and every
update is signed by its own enrolled device. The key holder decrypts the
real sum.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np

from aggregator.keyholder import KeyHolder, KeyholderVerifier
from aggregator.optimizers import FedAvg
from aggregator.planning import plan_rounds
from aggregator.rounds import (
    KeyholderAnswered,
    MessageReceived,
    Publish,
    RequestDecryption,
    RoundConfig,
    RoundMachine,
    Start,
)
from aggregator.store import AggregatorStore
from edge_sdk.crypto import (
    CiphertextAccumulator,
    CiphertextVector,
    generate_keypair,
    sum_ciphertexts,
)
from edge_sdk.crypto._gmp import mpz_from_bytes
from edge_sdk.crypto._parallel import default_workers, mulmod_loop, process_executor
from edge_sdk.identity import DeviceIdentity, DeviceRegistry
from edge_sdk.pipeline import RoundContext, seal
from edge_sdk.protocol import EncryptedUpdate, Topics, digest, split_payload

FED = "bench"


def _raw_mulmod(values: list[Any], nsq: Any, count: int) -> float:
    a = values[0]
    t0 = time.perf_counter()
    for i in range(count):
        a = a * values[i % len(values)] % nsq
    return count / (time.perf_counter() - t0)


def _resign(base: EncryptedUpdate, ident: DeviceIdentity, blob: bytes) -> EncryptedUpdate:
    fields = {f: getattr(base, f) for f in base.RULES}
    fields.update(device_id=ident.device_id, ciphertexts=blob, ciphertext_digest=digest(blob))
    unsigned = EncryptedUpdate(**fields)
    fields["signature"] = ident.sign(unsigned.signing_bytes())
    return EncryptedUpdate(**fields)


def run(quick: bool) -> dict[str, Any]:
    dim = 2_000 if quick else 50_000
    devices = 10 if quick else 100
    pk, sk = generate_keypair(2048)
    width = pk.ciphertext_bytes
    out: dict[str, Any] = {
        "devices": devices,
        "parameters": dim,
        "key_bits": 2048,
        "cores": default_workers(),
        "synthetic": (
            "1 real encrypted update from the device pipeline; the other devices' ciphertext "
            "vectors are rotations of it, each re-signed by its own enrolled device"
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        registry = DeviceRegistry(Path(tmp) / "reg.json", FED)
        idents = [DeviceIdentity.generate(f"d{i:03d}") for i in range(devices)]
        for ident in idents:
            registry.enroll(ident.device_id, ident.public_key_bytes, now_ms=1)
        plan = plan_rounds(
            pk, dimension=dim, max_contributors=128, min_clients=min(devices, 10), clip=1.0
        )
        config = RoundConfig(
            federation=FED,
            min_clients=min(devices, 10),
            target_clients=devices,
            round_duration_ms=10**9,
        )
        kh = KeyHolder(
            sk,
            registry,
            federation=FED,
            min_clients=min(devices, 10),
            identity=DeviceIdentity.generate("keyholder"),
        )
        machine = RoundMachine(
            config,
            plan,
            registry,
            FedAvg(),
            initial_weights=np.zeros(dim, np.float32),
            keyholder=KeyholderVerifier(kh.identity.public_key_bytes),
        )
        store = AggregatorStore(Path(tmp) / "agg.db", federation=FED)
        for action in machine.handle(Start(now_ms=1)):
            store.apply(action)
        ann = machine.announcement
        assert ann is not None
        ctx = RoundContext.from_announcement(ann, pk)
        values = np.random.default_rng(1).integers(-1000, 1000, dim).astype(np.int64)
        t0 = time.perf_counter()
        real = seal(values, ctx, idents[0], now_ms=2)
        out["encrypt_one_update_s"] = round(time.perf_counter() - t0, 2)
        base = real.ciphertexts
        ncts = len(base) // width

        def rotate(j: int) -> bytes:
            # rotate all but the last ciphertext, whose padding slots must stay zero
            body, last = base[:-width], base[-width:]
            cut = (j % max(ncts - 1, 1)) * width
            return body[cut:] + body[:cut] + last

        updates = [real] + [
            _resign(real, ident, rotate(j)) for j, ident in enumerate(idents[1:], start=1)
        ]
        out["ciphertexts_per_update"] = ncts
        messages = [
            [
                (Topics(FED).updates(u.device_id), c.to_bytes())
                for c in split_payload(
                    u.to_bytes(),
                    federation=FED,
                    stream="update",
                    sender=u.device_id,
                    round_id=u.round_id,
                )
            ]
            for u in updates
        ]

        # --- a whole round: ingest, persist, close, decrypt, optimizer ---------
        t_round = time.perf_counter()
        ingest_s = 0.0
        model_published = False
        for msgs in messages:
            t1 = time.perf_counter()
            pending = []
            for topic, payload in msgs:
                pending += machine.handle(MessageReceived(topic=topic, payload=payload, now_ms=3))
            for action in pending:
                store.apply(action)
            ingest_s += time.perf_counter() - t1
            for action in pending:
                if isinstance(action, RequestDecryption):
                    t2 = time.perf_counter()
                    result = kh.handle(action.request)
                    out["decrypt_s"] = round(time.perf_counter() - t2, 3)
                    for a2 in machine.handle(KeyholderAnswered(result=result, now_ms=4)):
                        store.apply(a2)
                        model_published |= isinstance(a2, Publish) and "/model/" in a2.topic
        round_s = time.perf_counter() - t_round
        store.close()
        assert model_published and machine.model is not None and machine.model.version == 1
        out["updates_per_s"] = round(devices / ingest_s, 1)
        out["round_s"] = round(round_s, 2)

    # --- additions vs the raw mulmod limit ------------------------------------
    vec = CiphertextVector.from_bytes(base, pk, ncts)
    vectors = [CiphertextVector.from_bytes(rotate(j), pk, ncts) for j in range(min(devices, 40))]
    nsq = gmpy2.mpz(pk.nsquare)
    raw_vals = [gmpy2.mpz(v) for v in vec.values[:64]]
    raw = _raw_mulmod(raw_vals, nsq, 20_000 if quick else 100_000)
    acc = CiphertextAccumulator(pk, ncts)
    t0 = time.perf_counter()
    for v in vectors:
        acc.add(v)
    adds = len(vectors) * ncts / (time.perf_counter() - t0)
    out["raw_mulmod_per_s"] = round(raw)
    out["adds_per_s_per_core"] = round(adds)
    out["adds_vs_raw"] = round(adds / raw, 3)

    # --- scaling of a large sum on 2 cores (long-lived executors) -------------
    # Same code path (blobs shipped to worker processes) with 1 and 2 workers;
    # the in-process single-core sum is reported too (no transfer, no parsing).
    big = vectors * (2 if quick else 3)
    t0 = time.perf_counter()
    one = sum_ciphertexts(pk, big, workers=1)
    out["sum_in_process_s"] = round(time.perf_counter() - t0, 3)
    # Same code path with 1 and 2 worker processes: blobs in shared memory,
    # long-lived pools warmed with a full-size sum (as an aggregator's pool
    # is after its first round); best of three.
    repeats = 2 if quick else 3

    def timed_sum(pool: Any, workers: int) -> tuple[float, Any]:
        sum_ciphertexts(pk, big, workers=workers, executor=pool)  # warm-up, full size
        best, result = float("inf"), None
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = sum_ciphertexts(pk, big, workers=workers, executor=pool)
            best = min(best, time.perf_counter() - t0)
        return best, result

    with process_executor(1, prestart=True) as pool1:
        t_one, _ = timed_sum(pool1, 1)
    with process_executor(2, prestart=True) as pool:
        t_two, two = timed_sum(pool, 2)
    assert one == two
    out["sum_vectors"] = len(big)
    out["sum_1_worker_s"] = round(t_one, 3)
    out["sum_2_workers_s"] = round(t_two, 3)
    out["speedup_2_cores"] = round(t_one / t_two, 2)
    out["speedup_2_cores_vs_in_process"] = round(out["sum_in_process_s"] / t_two, 2)

    # The limits behind that figure: how pure compute scales on these cores
    # (no transfer, no parsing), and what parsing one ciphertext costs.
    loops = 20_000 if quick else 100_000
    job = (int(vec.values[0]), pk.nsquare, loops)
    with process_executor(2, prestart=True) as pool:
        list(pool.map(mulmod_loop, [job, job]))  # warm
        t0 = time.perf_counter()
        list(pool.map(mulmod_loop, [job]))
        one_proc = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(pool.map(mulmod_loop, [(job[0], job[1], loops // 2)] * 2))
        two_proc = time.perf_counter() - t0
    out["raw_mulmod_speedup_2_processes"] = round(one_proc / two_proc, 2)
    blob = vec.to_bytes()
    t0 = time.perf_counter()
    for i in range(ncts):
        mpz_from_bytes(blob[i * width : (i + 1) * width], "big")
    out["parse_us_per_ciphertext"] = round((time.perf_counter() - t0) / ncts * 1e6, 3)
    out["mulmod_us"] = round(1e6 / raw, 3)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)

    out["targets"] = {
        "adds_per_core_vs_raw_mulmod": {
            "value": out["adds_vs_raw"],
            "target": ">= 0.70",
            "met": out["adds_vs_raw"] >= 0.70,
        },
        "speedup_2_cores": {
            "value": out["speedup_2_cores"],
            "target": ">= 1.8 (1 vs 2 worker processes; needs 2 idle cores)",
            "met": out["speedup_2_cores"] >= 1.8,
        },
        "round_s": {
            "value": out["round_s"],
            "target": "<= 10 s for 100 devices x 50k parameters"
            + (" (quick: smaller)" if quick else ""),
            "met": out["round_s"] <= 10.0,
        },
    }
    return out
