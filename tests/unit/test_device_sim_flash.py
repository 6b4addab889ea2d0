"""A/B flash slots and persisted device state (pure file logic, no network)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.flash import MAX_REMEMBERED_ATTEMPTS, Flash, Job, PersistedState


def test_provision_puts_factory_image_in_active_slot_a(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"factory", 3)
    assert flash.state.active == "a"
    assert flash.state.installed_sequence == 3
    assert flash.active_image() == b"factory"
    assert flash.state.slots["a"].digest == hashlib.sha256(b"factory").hexdigest()
    assert flash.read_slot("b") == b""


def test_download_writes_only_inactive_slot_and_activate_switches(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old image", 1)
    image = b"new image bytes" * 100
    digest = hashlib.sha256(image).hexdigest()
    assert flash.begin_download(digest, len(image)) == 0
    pos = flash.write_chunk(0, image[:700])
    flash.write_chunk(pos, image[700:])
    assert flash.active_image() == b"old image"
    assert flash.inactive_digest() == (digest, len(image))
    flash.mark_downloaded(digest, len(image), 2)
    flash.activate()
    flash.save()
    again = Flash(tmp_path / "dev")
    assert again.state.active == "b"
    assert again.state.installed_sequence == 2
    assert again.active_image() == image
    assert again.read_slot("a") == b"old image"  # the previous image stays as fallback


def test_activate_refuses_unverified_slot(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old", 1)
    with pytest.raises(RuntimeError):
        flash.activate()


def test_download_resumes_from_persisted_offset_and_truncates_beyond(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old", 1)
    digest = "ab" * 32
    flash.begin_download(digest, 1000)
    flash.write_chunk(0, b"x" * 400)
    flash.save()  # offset 400 persisted
    flash.write_chunk(400, b"y" * 100)  # written but not persisted: a crash here loses it
    restarted = Flash(tmp_path / "dev")
    assert restarted.begin_download(digest, 1000) == 400
    assert restarted.read_slot(restarted.state.inactive) == b"x" * 400


def test_download_of_another_image_starts_over(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old", 1)
    flash.begin_download("ab" * 32, 1000)
    flash.write_chunk(0, b"x" * 400)
    flash.save()
    assert flash.begin_download("cd" * 32, 1000) == 0
    assert flash.read_slot(flash.state.inactive) == b""


def test_discard_inactive_keeps_active(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old", 1)
    flash.begin_download("ab" * 32, 10)
    flash.write_chunk(0, b"0123456789")
    flash.discard_inactive()
    flash.save()
    again = Flash(tmp_path / "dev")
    assert again.read_slot("b") == b""
    assert again.state.download is None
    assert again.active_image() == b"old"


def test_state_file_is_replaced_atomically(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old", 1)
    flash.state.job = Job(4, 1, "downloading", 2, "ab" * 32, 10)
    flash.save()
    assert not (tmp_path / "dev" / "state.json.tmp").exists()
    data = json.loads((tmp_path / "dev" / "state.json").read_text())
    assert data["job"]["campaign"] == 4
    assert Flash(tmp_path / "dev").state.job == flash.state.job


def test_seq_increments_per_attempt_and_survives_restart(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old", 1)
    assert [flash.state.next_seq(5, 1) for _ in range(3)] == [1, 2, 3]
    assert flash.state.next_seq(5, 2) == 1
    flash.save()
    assert Flash(tmp_path / "dev").state.next_seq(5, 1) == 4


def test_finish_clears_matching_job_and_is_remembered() -> None:
    s = PersistedState()
    s.job = Job(7, 2, "downloading", 2, "ab" * 32, 10)
    s.finish(7, 1, 4)
    assert s.job is not None
    s.finish(7, 2, 1)
    assert s.job is None
    assert s.is_finished(7, 2) and s.is_finished(7, 1) and not s.is_finished(7, 3)


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 4)), max_size=400))
def test_bookkeeping_stays_bounded_and_seq_never_repeats_for_recent_attempts(
    attempts: list[tuple[int, int]],
) -> None:
    s = PersistedState()
    last: dict[tuple[int, int], int] = {}
    hello = [s.next_seq(0, 0)]
    for c, a in attempts:
        n = s.next_seq(c, a)
        if (c, a) in last and f"{c}:{a}" in s.seq:
            assert n > last[(c, a)]
        last[(c, a)] = n
        s.finish(c, a, 1)
        hello.append(s.next_seq(0, 0))
    assert len(s.seq) <= MAX_REMEMBERED_ATTEMPTS
    assert len(s.outcomes) <= MAX_REMEMBERED_ATTEMPTS
    assert hello == sorted(set(hello))  # the hello counter is never trimmed
    assert PersistedState.from_json(json.loads(json.dumps(s.to_json()))) == s


def test_state_json_matches_the_dataclass_and_round_trips(tmp_path: Path) -> None:
    from dataclasses import asdict

    from device_sim.flash import Download, SlotInfo

    st = PersistedState(active="b", installed_sequence=7, boots=3, evidence="ab")
    st.slots["a"] = SlotInfo("00" * 32, 10, 6)
    st.job = Job(5, 2, "downloading", 8, "11" * 32, 4096)
    st.job.limits = {"max_uses": 3.0}
    st.download = Download("11" * 32, 1024)
    st.next_seq(5, 2)
    st.finish(4, 1, 0)
    st.credentials["4"] = "cafe"
    st.usage["4"] = {"uses": 1.0}
    assert st.to_json() == asdict(st)
    flash = Flash(tmp_path / "dev")
    flash.state = st
    flash.save()
    assert Flash(tmp_path / "dev").state == st


def test_a_trial_boot_is_kept_by_confirm_or_undone_by_the_bootloader(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "dev")
    flash.provision(b"old image", 1)
    image = b"new image"
    flash.begin_download(hashlib.sha256(image).hexdigest(), len(image))
    flash.write_chunk(0, image)
    flash.mark_downloaded(hashlib.sha256(image).hexdigest(), len(image), 2)
    flash.activate()
    flash.save()
    trial = Flash(tmp_path / "dev")  # the trial survives a power cycle as state
    assert trial.state.trial and trial.state.installed_sequence == 2
    assert trial.active_digest() == hashlib.sha256(image).digest()
    trial.revert()  # reset unconfirmed: the previous slot boots again
    assert (trial.state.active, trial.state.installed_sequence, trial.state.trial) == ("a", 1, False)
    assert trial.active_image() == b"old image"
    assert trial.active_digest() == hashlib.sha256(b"old image").digest()
    trial.activate()
    trial.confirm()
    assert not trial.state.trial and trial.state.installed_sequence == 2
