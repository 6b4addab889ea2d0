"""Simulated A/B flash and the device's persisted state.

A real device keeps two firmware slots and boots from one of them; an update is written into the
other (inactive) slot, verified there and only then made active, so a failed or interrupted
update never touches the running image.  Here each slot is a file and everything the device must
remember across a power cycle (active slot, installed sequence number, per-attempt report counters,
finished attempts, an interrupted download, unacknowledged reports) lives in ``state.json``,
replaced atomically so a crash at any point leaves either the old or the new state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")
MAX_REMEMBERED_ATTEMPTS = 64
"""Finished attempts and seq counters kept; older ones are forgotten (bounded state)."""


def other_slot(slot: SlotName) -> SlotName:
    return "b" if slot == "a" else "a"


def attempt_key(campaign: int, attempt: int) -> str:
    return f"{campaign}:{attempt}"


@dataclass
class SlotInfo:
    """What a slot holds: the image digest (hex), its size and the manifest sequence it came from."""

    digest: str | None = None
    size: int = 0
    sequence: int | None = None
    components: dict[str, str] = field(default_factory=dict)
    """Further components of a multi-component update held with the image: part name → digest
    (hex). They are activated and reverted with the slot, so they install together or not at all."""


@dataclass
class Job:
    """The update attempt in progress.

    ``phase`` moves verifying → downloading → downloaded → installing → booted → (confirmed and
    reported: the job ends). "booted" is the trial boot: the new slot runs but is not confirmed, so
    a reset now makes the bootloader fall back ("reverted": only the REVERTED report remains).
    """

    campaign: int
    attempt: int
    phase: str
    sequence: int
    digest: str
    size: int
    notice: str | None = None
    """Group installs: the update notice (CBOR, hex), kept to install on commit after a restart."""
    limits: dict[str, float] | None = None
    """Time-limited installs: max_uses / expires_after / accounting_every from the notice."""

    @property
    def key(self) -> str:
        return attempt_key(self.campaign, self.attempt)


@dataclass
class Download:
    """An interrupted download into the inactive slot: resume at ``offset`` if the digest matches."""

    digest: str
    offset: int
    part: str = ""
    """Which image of the slot: "" for the main one, a component's part name for the others."""


@dataclass
class PersistedState:
    """Everything the device remembers across a power cycle, kept in ``state.json``."""

    active: SlotName = "a"
    installed_sequence: int = 0
    slots: dict[str, SlotInfo] = field(default_factory=lambda: {s: SlotInfo() for s in SLOTS})
    seq: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    """Finished attempts: "campaign:attempt" → Result code; notices for them are ignored."""
    job: Job | None = None
    download: Download | None = None
    outbox: list[str] = field(default_factory=list)
    """Sealed reports (hex) not yet acknowledged by the server, oldest first."""
    boots: int = 0
    trial: bool = False
    """The active slot runs on trial (MCUboot test, RAUC not yet marked good): booted once and not
    confirmed, so the next reset boots the previous slot again."""
    credentials: dict[str, str] = field(default_factory=dict)
    """Installation credentials (hex COSE_Sign1) by campaign: proof of what was installed."""
    evidence: str | None = None
    """The last attestation evidence sent (hex); only a rogue device ever sends it again."""
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    """Installed software that reports usage (and may expire), by campaign."""

    @property
    def inactive(self) -> SlotName:
        return other_slot(self.active)

    def next_seq(self, campaign: int, attempt: int) -> int:
        """Next report sequence number for an attempt; the caller persists before sending."""
        key = attempt_key(campaign, attempt)
        value = self.seq.get(key, 0) + 1
        self.seq.pop(key, None)
        self.seq[key] = value  # re-insert: dict order is recency order for trimming
        _trim(self.seq, keep={attempt_key(0, 0)})
        return value

    def finish(self, campaign: int, attempt: int, result: int) -> None:
        key = attempt_key(campaign, attempt)
        self.outcomes.pop(key, None)
        self.outcomes[key] = result
        _trim(self.outcomes, keep=set())
        if self.job is not None and self.job.key == key:
            self.job = None

    def is_finished(self, campaign: int, attempt: int) -> bool:
        return attempt_key(campaign, attempt) in self.outcomes

    def to_json(self) -> dict[str, Any]:
        """Plain data for ``state.json``, to be serialised at once (it shares the inner dicts):
        ``dataclasses.asdict`` deep-copies, which cost more than writing the file."""
        data = dict(vars(self))
        data["slots"] = {name: vars(slot) for name, slot in self.slots.items()}
        data["job"] = vars(self.job) if self.job is not None else None
        data["download"] = vars(self.download) if self.download is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PersistedState:
        job = data.get("job")
        download = data.get("download")
        active = data.get("active", "a")
        if active not in SLOTS:
            raise ValueError(f"bad active slot {active!r}")
        return cls(
            active=active,
            installed_sequence=int(data.get("installed_sequence", 0)),
            slots={s: SlotInfo(**data.get("slots", {}).get(s, {})) for s in SLOTS},
            seq={str(k): int(v) for k, v in data.get("seq", {}).items()},
            outcomes={str(k): int(v) for k, v in data.get("outcomes", {}).items()},
            job=Job(**job) if job else None,
            download=Download(**download) if download else None,
            outbox=[str(x) for x in data.get("outbox", [])],
            boots=int(data.get("boots", 0)),
            trial=bool(data.get("trial", False)),
            credentials={str(k): str(v) for k, v in data.get("credentials", {}).items()},
            evidence=data.get("evidence"),
            usage={str(k): dict(v) for k, v in data.get("usage", {}).items()},
        )


def _trim(d: dict[str, int], keep: set[str]) -> None:
    while len(d) > MAX_REMEMBERED_ATTEMPTS:
        for k in d:
            if k not in keep:
                del d[k]
                break
        else:
            return


class Flash:
    """A device's directory: two slot files plus ``state.json``.

    Only the inactive slot is ever written; ``activate`` flips the active slot in the state file in
    one atomic replace, which is the simulated equivalent of setting the bootloader flag.
    """

    def __init__(self, directory: Path, *, durable: bool = False) -> None:
        self.dir = directory
        self.durable = durable
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self._state_file, self._state_tmp = str(self.state_path), str(self.dir / "state.json.tmp")
        self.state = self._load()

    # -- state ------------------------------------------------------------------------------

    def _load(self) -> PersistedState:
        if not self.state_path.exists():
            return PersistedState()
        with self.state_path.open("rb") as f:
            return PersistedState.from_json(json.load(f))

    @property
    def exists(self) -> bool:
        return self.state_path.exists()

    def save(self) -> None:
        """Replace ``state.json`` atomically (write a temp file, then rename over it).  Plain
        ``os`` calls: a fleet saves thousands of times a second, and the file objects' layers
        cost more than the write."""
        data = json.dumps(self.state.to_json(), separators=(",", ":")).encode()
        fd = os.open(self._state_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            if self.durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._state_tmp, self._state_file)

    # -- slots ------------------------------------------------------------------------------

    def slot_path(self, slot: SlotName, part: str = "") -> Path:
        """A slot's main image (``part`` ""), or the file of one of its further components."""
        return self.dir / (f"slot_{slot}.{part}.bin" if part else f"slot_{slot}.bin")

    def provision(self, image: bytes, sequence: int) -> None:
        """Factory state: ``image`` in slot A, active, at ``sequence``; slot B empty."""
        self.slot_path("a").write_bytes(image)
        self.slot_path("b").write_bytes(b"")
        self.state = PersistedState(active="a", installed_sequence=sequence)
        self.state.slots["a"] = SlotInfo(hashlib.sha256(image).hexdigest(), len(image), sequence)
        self.save()

    def read_slot(self, slot: SlotName, part: str = "") -> bytes:
        path = self.slot_path(slot, part)
        return path.read_bytes() if path.exists() else b""

    def active_image(self) -> bytes:
        return self.read_slot(self.state.active)

    def begin_download(self, digest: str, size: int, part: str = "") -> int:
        """Prepare the inactive slot (its main image, or component ``part``) for ``digest``; return
        the offset to resume from. Starting the main image forgets what the slot held."""
        dl = self.state.download
        path = self.slot_path(self.state.inactive, part)
        if dl is not None and dl.digest == digest and dl.part == part and 0 < dl.offset <= size:
            current = path.stat().st_size if path.exists() else 0
            if current >= dl.offset:
                with path.open("r+b") as f:
                    f.truncate(dl.offset)
                return dl.offset
        path.write_bytes(b"")
        if not part:
            self.state.slots[self.state.inactive] = SlotInfo()
        self.state.download = Download(digest, 0, part)
        self.save()
        return 0

    def write_chunk(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` of the image being downloaded into the inactive slot; return
        the new offset (not yet saved)."""
        part = self.state.download.part if self.state.download is not None else ""
        fd = os.open(self.slot_path(self.state.inactive, part), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        end = offset + len(data)
        if self.state.download is not None:
            self.state.download.offset = end
        return end

    def inactive_digest(self, part: str = "") -> tuple[str, int]:
        """SHA-256 (hex) and size of what the inactive slot holds (its main image or component
        ``part``), computed from the file."""
        h = hashlib.sha256()
        size = 0
        path = self.slot_path(self.state.inactive, part)
        if not path.exists():
            return h.hexdigest(), 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 16):
                h.update(chunk)
                size += len(chunk)
        return h.hexdigest(), size

    def write_inactive(self, image: bytes) -> None:
        """Write a whole image (a patch's result) as the inactive slot's main image."""
        self.slot_path(self.state.inactive).write_bytes(image)

    def drop_part(self, part: str) -> None:
        """Forget one further file of the inactive slot (a patch once applied)."""
        self.slot_path(self.state.inactive, part).unlink(missing_ok=True)

    def mark_downloaded(
        self, digest: str, size: int, sequence: int, components: dict[str, str] | None = None
    ) -> None:
        """Every image of the update is in the inactive slot and verified."""
        self.state.slots[self.state.inactive] = SlotInfo(digest, size, sequence, dict(components or {}))
        self.state.download = None

    def discard_inactive(self) -> None:
        """Erase the inactive slot, every component of it: a failed or cancelled update leaves
        nothing half-written."""
        with contextlib.suppress(FileNotFoundError):
            self.slot_path(self.state.inactive).write_bytes(b"")
        for path in self.dir.glob(f"slot_{self.state.inactive}.*.bin"):
            path.unlink(missing_ok=True)
        self.state.slots[self.state.inactive] = SlotInfo()
        self.state.download = None

    def activate(self) -> None:
        """Boot into the inactive slot on trial (in memory; the caller saves)."""
        self._boot(self.state.inactive)
        self.state.trial = True

    def confirm(self) -> None:
        """The running image passed its health check: keep it (MCUboot confirm, RAUC mark-good)."""
        self.state.trial = False

    def revert(self) -> None:
        """The bootloader's fallback after a trial boot that was never confirmed: boot the
        previous slot again (in memory; the caller saves)."""
        self._boot(self.state.inactive)
        self.state.trial = False

    def _boot(self, slot: SlotName) -> None:
        info = self.state.slots[slot]
        if info.digest is None or info.sequence is None:
            raise RuntimeError(f"slot {slot} holds no verified image")
        self.state.active = slot
        self.state.installed_sequence = info.sequence
        self.state.boots += 1

    def active_digest(self) -> bytes | None:
        """SHA-256 of the image running now, as the slot's record says."""
        digest = self.state.slots[self.state.active].digest
        return bytes.fromhex(digest) if digest is not None else None
