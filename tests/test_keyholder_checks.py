"""The key holder decrypts only a verified sum of at least min_clients contributions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.keyholder import KeyholderVerifier
from aggregator.rounds import Start
from edge_sdk.crypto import CiphertextVector, sum_ciphertexts
from edge_sdk.errors import InvalidSignatureError
from edge_sdk.identity import DeviceIdentity
from edge_sdk.protocol import ContributorProof, EncryptedUpdate, KeyholderRequest
from tests import test_aggregator_support as _support
from tests.test_aggregator_support import (
    FED,
    Fleet,
    deltas,
    make_keyholder,
    make_machine,
    make_update,
)

keypair = _support.keypair  # session fixture

DIM = 30


@pytest.fixture
def setup(keypair: Any, tmp_path: Path) -> dict[str, Any]:
    pk, sk = keypair
    fleet = Fleet.create(5, tmp_path / "reg.json")
    machine = make_machine(pk, fleet, dim=DIM)
    machine.handle(Start(now_ms=1))
    ann = machine.announcement
    assert ann is not None
    ups: list[tuple[EncryptedUpdate, Any]] = [
        make_update(ann, pk, fleet.identities[d], deltas(5, DIM)[i])
        for i, d in enumerate(fleet.ids())
    ]
    return {"pk": pk, "sk": sk, "fleet": fleet, "spec": machine.plan.packing, "ups": ups}


def _request(
    s: dict[str, Any],
    ups: list[EncryptedUpdate],
    *,
    round_id: int = 1,
    proofs: tuple[ContributorProof, ...] | None = None,
    request_id: str = "req1",
) -> KeyholderRequest:

    pk = s["pk"]
    vectors = [CiphertextVector.from_bytes(u.ciphertexts, pk, u.num_ciphertexts) for u in ups]
    total = sum_ciphertexts(pk, vectors, workers=1)
    return KeyholderRequest(
        federation=FED,
        round_id=round_id,
        request_id=request_id,
        packing=s["spec"].to_bytes(),
        packing_digest=s["spec"].digest(),
        contributors=KeyholderRequest.pack_proofs(
            proofs if proofs is not None else tuple(u.proof() for u in ups)
        ),
        encrypted_sum=total.to_bytes(),
        issued_ms=10,
    )


def test_decrypts_quorum_sum_exactly_and_signs(setup: dict[str, Any]) -> None:
    kh = make_keyholder(setup["sk"], setup["fleet"], min_clients=3)
    ups = [u for u, _ in setup["ups"][:3]]
    result = kh.handle(_request(setup, ups))
    assert result.status == "ok" and result.count == 3
    expected = np.sum([v for _, v in setup["ups"][:3]], axis=0)
    np.testing.assert_array_equal(np.frombuffer(result.aggregate, "<i8"), expected)
    KeyholderVerifier(kh.identity.public_key_bytes).verify(result)
    with pytest.raises(InvalidSignatureError):
        KeyholderVerifier(DeviceIdentity.generate("other").public_key_bytes).verify(result)


def test_refuses_min_clients_minus_one(setup: dict[str, Any]) -> None:
    kh = make_keyholder(setup["sk"], setup["fleet"], min_clients=3)
    result = kh.handle(_request(setup, [u for u, _ in setup["ups"][:2]]))
    assert result.status == "refused" and result.reason == "quorum" and result.aggregate == b""


def test_refuses_duplicate_contributor(setup: dict[str, Any]) -> None:
    kh = make_keyholder(setup["sk"], setup["fleet"], min_clients=3)
    ups = [u for u, _ in setup["ups"][:2]]
    proofs = (ups[0].proof(), ups[1].proof(), ups[0].proof())
    result = kh.handle(_request(setup, ups, proofs=proofs))
    assert result.status == "refused" and result.reason == "duplicate_contributor"


def test_refuses_unregistered_or_forged_proofs(setup: dict[str, Any], tmp_path: Path) -> None:
    ups = [u for u, _ in setup["ups"][:3]]
    # the key holder's own registry lacks dev02
    own = Fleet(setup["fleet"].identities, type(setup["fleet"].registry)(tmp_path / "kh.json"))
    for d in ("dev00", "dev01"):
        own.registry.enroll(d, setup["fleet"].identities[d].public_key_bytes, now_ms=1)
    kh = make_keyholder(setup["sk"], own, min_clients=3)
    assert kh.handle(_request(setup, ups)).reason == "proof_unknown_device"
    kh2 = make_keyholder(setup["sk"], setup["fleet"], min_clients=3)
    p = ups[2].proof()
    fields = {f: getattr(p, f) for f in p.RULES}
    fields["signature"] = bytes(64)
    forged = (ups[0].proof(), ups[1].proof(), ContributorProof(**fields))
    assert kh2.handle(_request(setup, ups, proofs=forged)).reason == "proof_invalid_signature"


def test_refuses_proofs_of_another_round(setup: dict[str, Any]) -> None:
    kh = make_keyholder(setup["sk"], setup["fleet"], min_clients=3)
    ups = [u for u, _ in setup["ups"][:3]]
    assert kh.handle(_request(setup, ups, round_id=2)).reason == "proof_mismatch"


def test_one_sum_per_round_but_idempotent(setup: dict[str, Any]) -> None:
    kh = make_keyholder(setup["sk"], setup["fleet"], min_clients=3)
    a = _request(setup, [u for u, _ in setup["ups"][:3]])
    assert kh.handle(a).status == "ok"
    assert kh.handle(a).status == "ok"  # the same request again (aggregator restart)
    b = _request(setup, [u for u, _ in setup["ups"][1:4]], request_id="req2")
    result = kh.handle(b)
    assert result.status == "refused" and result.reason == "round_already_decrypted"


def test_verify_mode_catches_a_sum_that_is_not_the_product(setup: dict[str, Any]) -> None:
    kh = make_keyholder(setup["sk"], setup["fleet"], min_clients=3)
    ups = [u for u, _ in setup["ups"][:3]]
    honest = _request(setup, ups)
    blobs = {u.device_id: u.ciphertexts for u in ups}
    # the aggregator lists 3 proofs but sends only dev00's ciphertexts as the "sum"
    fields = {f: getattr(honest, f) for f in honest.RULES}
    fields["encrypted_sum"] = ups[0].ciphertexts
    lying = KeyholderRequest(**fields)
    assert kh.handle(lying, ciphertexts=blobs).reason == "verify_sum_mismatch"
    assert kh.handle(honest, ciphertexts=blobs).status == "ok"
