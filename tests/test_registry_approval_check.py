"""The committee's approvals checked ahead of a device's updates (and safely beside them)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import edge_sdk.identity as identity
from edge_sdk.identity import DeviceIdentity, DeviceRegistry, check_approvals_in_background


def _registry(tmp_path: Path, n: int, approved: int) -> tuple[DeviceRegistry, list[DeviceIdentity]]:
    """``n`` devices, the first ``approved`` of them approved by 2 of 3 members."""
    members = [DeviceIdentity.generate(f"kh{i}") for i in range(3)]
    registry = DeviceRegistry(tmp_path / "registry.json", "fed")
    for i in range(n):
        registry.enroll(f"dev{i}", DeviceIdentity.generate(f"dev{i}").public_key_bytes, now_ms=1)
        if i < approved:
            registry.approve(f"dev{i}", members[0])
            registry.approve(f"dev{i}", members[1])
    registry.require_approvals({m.device_id: m.public_key_bytes for m in members}, 2)
    return registry, members


class _CountingVerify:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self._real = identity.verify_signature
        monkeypatch.setattr(identity, "verify_signature", self)

    def __call__(self, key: bytes, data: bytes, signature: bytes) -> None:
        self.calls += 1
        self._real(key, data, signature)


def test_checked_approvals_are_not_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, members = _registry(tmp_path, 6, approved=4)
    registry.revoke("dev0", now_ms=2)
    registry.approve("dev4", members[0])  # one approval: below the threshold of 2
    counter = _CountingVerify(monkeypatch)
    assert registry.check_approvals() == 3  # dev1..dev3 (dev0 revoked, dev4/dev5 unapproved)
    checked = counter.calls
    assert checked == 7  # two approvals each of dev1..dev3, dev4's one
    assert all(registry.is_active(f"dev{i}") for i in (1, 2, 3))
    assert counter.calls == checked  # remembered: no signature checked again
    assert not registry.is_active("dev4") and not registry.is_active("dev0")
    assert counter.calls == checked + 1  # an unapproved device is never remembered as approved


def test_a_change_of_approvers_during_a_check_is_not_overtaken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, _ = _registry(tmp_path, 1, approved=1)
    others = [DeviceIdentity.generate(f"new{i}") for i in range(2)]
    real = identity.verify_signature
    changed = []

    def verify_then_change(key: bytes, data: bytes, signature: bytes) -> None:
        real(key, data, signature)
        if not changed:  # the committee changes while the old approvals are being checked
            changed.append(True)
            registry.require_approvals({m.device_id: m.public_key_bytes for m in others}, 2)

    monkeypatch.setattr(identity, "verify_signature", verify_then_change)
    registry.check_approvals()
    monkeypatch.setattr(identity, "verify_signature", real)
    # the new committee never approved dev0: the check begun under the old one is not kept
    assert not registry.is_active("dev0")
    registry.approve("dev0", others[0])
    registry.approve("dev0", others[1])
    assert registry.is_active("dev0")


def test_a_new_approval_or_enrollment_forgets_what_was_checked(tmp_path: Path) -> None:
    registry, members = _registry(tmp_path, 2, approved=2)
    assert registry.check_approvals() == 2
    registry.revoke("dev1", now_ms=3)
    new_key = DeviceIdentity.generate("dev1")
    registry.enroll("dev1", new_key.public_key_bytes, now_ms=4)  # a new key: new approvals due
    assert not registry.is_active("dev1")
    registry.approve("dev1", members[2])
    registry.approve("dev1", members[0])
    assert registry.is_active("dev1")


def test_background_check_fills_the_cache_and_stops_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, _ = _registry(tmp_path, 8, approved=8)
    counter = _CountingVerify(monkeypatch)
    stopped = threading.Event()
    stopped.set()
    assert registry.check_approvals(stop=stopped) == 0 and counter.calls == 0
    stop = check_approvals_in_background(registry, [f"dev{i}" for i in range(4)])
    deadline = time.monotonic() + 30
    while counter.calls < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert counter.calls == 8  # two approvals of each of the four devices named, no more
    stop.set()
    before = counter.calls
    assert all(registry.is_active(f"dev{i}") for i in range(4))
    assert counter.calls == before
    assert registry.is_active("dev5") and counter.calls == before + 2  # not named: checked now
