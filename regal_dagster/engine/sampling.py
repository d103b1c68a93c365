"""The monthly restore-test sample: backups drawn at random across targets and ages, reproducibly.

The seed is random (nobody can know in advance which backups will be tested), and it is recorded with
the full list of candidates in `restore-tests/samples/<YYYY-MM>.json`: `choose(candidates, seed, n)`
gives the same draw again, so an auditor can check that the sample was random and not hand-picked.
One draw per month: evaluating the schedule again in the same month returns the recorded draw.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .checks import good_backups
from .crypto import Keyring
from .documents import read_document, write_document
from .layout import restore_sample_key
from .policy import Policy
from .storage import Repository


@dataclass
class RestoreSample:
    month: str
    seed: str
    drawn_at: datetime
    candidates: list[tuple[str, str]]  # (target, backup id), sorted
    chosen: list[tuple[str, str]]

    def to_json(self) -> dict[str, object]:
        return {"format": "regal-backup-restore-sample", "version": 1, "month": self.month, "seed": self.seed,
                "drawn_at": self.drawn_at.isoformat(), "method": "random.Random(seed).sample(sorted(candidates), n)",
                "candidates": [list(c) for c in self.candidates], "chosen": [list(c) for c in self.chosen]}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RestoreSample:
        return cls(str(body["month"]), str(body["seed"]), datetime.fromisoformat(str(body["drawn_at"])),
                   [(str(t), str(b)) for t, b in body["candidates"]], [(str(t), str(b)) for t, b in body["chosen"]])


def choose(candidates: list[tuple[str, str]], seed: str, n: int) -> list[tuple[str, str]]:
    """The draw: deterministic for a seed (Python's Mersenne Twister seeded from the string's SHA-512)."""
    return sorted(random.Random(seed).sample(sorted(candidates), min(n, len(candidates))))


def draw_point(low: int, high: int, seed: str) -> int:
    """A point drawn uniformly from [low, high] (e.g. a WAL position a restore test recovers to), deterministic for a
    seed like `choose`: recorded with the seed, the draw can be checked."""
    return random.Random(seed).randint(low, max(low, high))


DRAW_POINT_METHOD = "random.Random(seed).randint(low, high)"
SAMPLE_KIND = "restore-sample"


def draw_restore_sample(policy: Policy, repo: Repository, keyring: Keyring, when: datetime) -> RestoreSample:
    month = f"{when.astimezone(UTC):%Y-%m}"
    key = restore_sample_key(month)
    if repo.size(key) is not None:  # the month's draw, sealed: a planted one is refused, naming the file
        return RestoreSample.from_json(read_document(repo, keyring, SAMPLE_KIND, key))
    candidates = sorted((target, m.backup_id) for target in policy.targets
                        for m in good_backups(repo, keyring, target))
    seed = secrets.token_hex(16)
    sample = RestoreSample(month, seed, datetime.now(UTC), candidates,
                           choose(candidates, seed, policy.restore_tests.monthly_sample))
    write_document(repo, keyring, SAMPLE_KIND, key, sample.to_json())
    return sample
