"""The checks every backup gets, and their record in the repository.

- `manifest`   ERROR: the manifest's own checksum holds; every object it lists exists with its size.
- `integrity`  ERROR: every stored byte read back, authenticated, decompressed; both SHA-256 sums match;
               the objects parse as what they claim to be (the kind's `check_structure`: a PostgreSQL
               archive's table of contents, an RDB, a Terraform state, a git bundle).
- `encryption` ERROR: every object starts with our header and a key id the keyset holds (the one the
               manifest names); no plaintext of the source in samples from both ends of every object
               (table and column names, e-mail addresses, card tokens and card numbers); on S3 the store
               reports server-side encryption as well.
- `size`       WARN:  the backup's size is within the policy's tolerance of the recent good backups.
- `key_cryptoperiod`, `offsite_copy`: the setup around the backup (they alert; they do not decide "good").
- and the kind's own checks (engine/sources/<kind>/: Redis persistence, Terraform serials).

The outcome is written next to the manifest as `checks.json`. A backup is *good* when every ERROR check
passed: only good backups count for freshness (the RPO), retention and restore tests. A backup without
a record yet is *unchecked*, and not good either; one whose record is older than the newest its target's
witnesses know (or gone while they know one) is *rolled_back* (engine/record_sequence.py), and not good.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import statistics
from collections.abc import Iterator
from datetime import UTC, datetime

from . import audit
from .catalog import being_deleted, list_backups, newest_first
from .check_record import CheckRecord, check_status
from .crypto import OBJECT_FORMAT_VERSION, OBJECT_HEADER, OBJECT_MAGIC, Keyring
from .errors import IntegrityError, RegalError, UsageError
from .layout import backup_prefix, checks_key, manifest_key, target_of, valid_backup_id
from .manifest import Manifest
from .outcomes import ERROR, CheckOutcome
from .pipeline import Progress, StoredBackup
from .policy import Policy
from .record_sequence import KnownRecords, known_records, next_record
from .sources.registry import source_for
from .storage import Repository, open_offsite
from .verify import ReadSample, presence_problem, stored_sizes, verify_backup


def check_names(kind: str, offsite: bool = False) -> list[str]:
    """The checks a backup of this kind gets (offsite_copy when there is an off-site repository)."""
    return ["manifest", "integrity", "encryption", "size", *source_for(kind).checks, "key_cryptoperiod",
            *(["offsite_copy"] if offsite else [])]


_EMAIL = re.compile(rb"[A-Za-z0-9._%+-]{3,64}@[A-Za-z0-9-]{3,63}\.[A-Za-z0-9.-]{2,63}")
_CARD_TOKEN = re.compile(rb"tok_[0-9A-Za-z]{8,}")
_DIGITS = re.compile(rb"(?<![0-9])[0-9]{13,19}(?![0-9])")


# --- the checks ------------------------------------------------------------------------------------

def check_manifest(repo: Repository, keyring: Keyring, backup_id: str) -> tuple[CheckOutcome, Manifest | None]:
    key = manifest_key(target_of(backup_id), backup_id)
    if repo.size(key) is None:
        return CheckOutcome("manifest", False, f"the manifest {key} is missing", key), None
    try:
        manifest = Manifest.from_bytes(repo.get_bytes(key), key, keyring)
    except IntegrityError as exc:
        return CheckOutcome("manifest", False, exc.message, key), None
    retired = sorted({o.encryption.key_id for o in manifest.objects
                      if (info := keyring.history.get(o.encryption.key_id)) is not None and info.retired_at})
    if retired:
        return CheckOutcome("manifest", False, f"the manifest names objects under key(s) {retired}, retired since: "
                            "it is an older version put back after the backup was re-encrypted", key), manifest
    sizes = stored_sizes(repo, manifest)
    for record in manifest.objects:
        if problem := presence_problem(record, sizes[record.key]):
            return CheckOutcome("manifest", False, problem, record.key), manifest
    return CheckOutcome("manifest", True, f"seal holds; all {len(manifest.objects)} objects present with "
                        "their sizes", metadata={"objects": len(manifest.objects)}), manifest


def check_integrity(repo: Repository, keyring: Keyring, manifest: Manifest, jobs: int,
                    progress: Progress | None = None, sample: ReadSample | None = None) -> CheckOutcome:
    chosen = sample.choose(manifest) if sample else None
    result = verify_backup(repo, keyring, manifest, jobs=jobs, progress=progress, only=chosen)
    drawn = {"sample": sample.to_json(chosen, len(manifest.objects))} if sample and chosen is not None else {}
    bad = next((o for o in result.objects if not o.ok), None)
    if bad is not None:
        return CheckOutcome("integrity", False, bad.detail, bad.key,
                            {"objects_failed": sum(not o.ok for o in result.objects), **drawn,
                             **({"audit": drawn} if drawn else {})})
    if sample and chosen is not None:
        read = sum(r.size for r in manifest.objects if r.key in chosen)
        return CheckOutcome("integrity", True, f"sample of {sample.percent:g}% (seed {sample.seed}): {read} stored "
                            f"bytes in {len(chosen)} of {len(manifest.objects)} objects authenticated and "
                            "checksummed; the others present with their sizes", metadata={
                                "bytes_read": read, **drawn, "audit": drawn})
    structure = source_for(manifest.kind).check_structure(StoredBackup(repo, keyring, manifest))
    return CheckOutcome("integrity", True, f"{manifest.stored_bytes} stored bytes in {len(manifest.objects)} "
                        f"objects authenticated and checksummed; {structure}",
                        metadata={"bytes_read": manifest.stored_bytes})


def check_encryption(repo: Repository, keyring: Keyring, manifest: Manifest, sample_bytes: int) -> CheckOutcome:
    needles = source_for(manifest.kind).plaintext_needles(manifest)
    sizes = stored_sizes(repo, manifest)
    sampled = 0
    for record in manifest.objects:
        head = repo.read_range(record.key, 0, sample_bytes)
        if len(head) < OBJECT_HEADER.size or head[:4] != OBJECT_MAGIC:
            return CheckOutcome("encryption", False, f"object {record.key} is not in the encrypted format "
                                "(no regal-backup header)", record.key)
        _, version, key_id = OBJECT_HEADER.unpack(head[:OBJECT_HEADER.size])
        if version != OBJECT_FORMAT_VERSION or key_id != record.encryption.key_id:
            return CheckOutcome("encryption", False, f"object {record.key} has format {version} and key {key_id}; "
                                f"the manifest says key {record.encryption.key_id}", record.key)
        if key_id not in keyring.key_ids:
            return CheckOutcome("encryption", False, f"object {record.key} is encrypted with key {key_id}, which "
                                "the keyset does not hold", record.key)
        # the ends of what is stored (a swapped or truncated object has another size than the manifest's)
        stored = sizes[record.key]
        stored = len(head) if stored is None else stored
        tail_start = max(len(head), stored - sample_bytes)
        sample = head + repo.read_range(record.key, tail_start, max(0, stored - tail_start))
        sampled += len(sample)
        if found := _find_plaintext(sample, needles):
            return CheckOutcome("encryption", False, f"object {record.key} contains plaintext ({found})", record.key)
        if repo.encrypts_at_rest and repo.server_side_encryption(record.key) is None:
            return CheckOutcome("encryption", False, f"object {record.key} is not encrypted at rest by the store",
                                record.key)
    key_ids = sorted({o.encryption.key_id for o in manifest.objects})
    return CheckOutcome("encryption", True, f"{len(manifest.objects)} objects encrypted with key(s) "
                        f"{', '.join(map(str, key_ids))}; no plaintext in {sampled} sampled bytes"
                        + ("; server-side encryption on every object" if repo.encrypts_at_rest else ""),
                        metadata={"key_ids": key_ids, "sampled_bytes": sampled})


def _find_plaintext(sample: bytes, needles: list[bytes]) -> str | None:
    for needle in needles:
        if needle in sample:
            return "a table or column name"
    if _EMAIL.search(sample):
        return "an e-mail address"
    if _CARD_TOKEN.search(sample):
        return "a card token"
    if any(_luhn(m.group()) for m in _DIGITS.finditer(sample)):
        return "a card number"
    return None


def _luhn(digits: bytes) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = d - 48
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def check_cryptoperiod(policy: Policy, keyring: Keyring, now: datetime) -> CheckOutcome:
    """How long the primary key (the one new backups use) has been primary, against the cryptoperiod."""
    primary = keyring.history[keyring.primary_key_id]
    since_text = primary.primary_since or primary.created_at
    if since_text is None:
        return CheckOutcome("key_cryptoperiod", False, f"key {primary.key_id} has no recorded start: its "
                            "cryptoperiod cannot be shown; run `regal-backup keys rotate`", level=ERROR)
    since = datetime.fromisoformat(since_text)
    ends = since + policy.encryption.cryptoperiod
    facts = {"key_id": primary.key_id, "primary_since": since_text, "cryptoperiod_ends": ends.isoformat()}
    if now >= ends:
        return CheckOutcome("key_cryptoperiod", False, f"key {primary.key_id}, primary since {since:%Y-%m-%d}, is "
                            f"past its cryptoperiod ({policy.encryption.cryptoperiod.days} days, ended "
                            f"{ends:%Y-%m-%d}): run `regal-backup keys rotate`", metadata=facts, level=ERROR)
    left = (ends - now).days
    if now >= ends - policy.encryption.cryptoperiod_warning:
        return CheckOutcome("key_cryptoperiod", False, f"key {primary.key_id}'s cryptoperiod ends in {left} days "
                            f"({ends:%Y-%m-%d}): plan `regal-backup keys rotate`", metadata=facts)
    return CheckOutcome("key_cryptoperiod", True, f"key {primary.key_id}, primary since {since:%Y-%m-%d}; "
                        f"{left} days of its cryptoperiod left", metadata=facts)


def check_offsite(repo: Repository, secondary: Repository, manifest: Manifest) -> CheckOutcome:
    from .offsite import compare_copy

    problems = compare_copy(repo, secondary, manifest)
    if problems:
        first = problems[0]
        return CheckOutcome("offsite_copy", False, f"{len(problems)} object(s) missing or different in "
                            f"{secondary.location}, first {first.key}: {first.problem}; run "
                            "`regal-backup offsite sync`", first.key, {"problems": len(problems)})
    return CheckOutcome("offsite_copy", True, f"all {len(manifest.objects)} objects and the manifest read back "
                        f"from {secondary.location} with the same SHA-256",
                        metadata={"objects": len(manifest.objects)})


def check_size(manifest: Manifest, recent_good: list[Manifest], tolerance: float) -> CheckOutcome:
    sizes = [m.plaintext_bytes for m in recent_good]
    if len(sizes) < 3:
        return CheckOutcome("size", True, f"{manifest.plaintext_bytes} bytes; fewer than 3 earlier good backups "
                            "to compare with", metadata={"bytes": manifest.plaintext_bytes})
    median = statistics.median(sizes)
    change = (manifest.plaintext_bytes - median) / max(median, 1)
    passed = abs(change) <= tolerance
    description = (f"{manifest.plaintext_bytes} bytes, {change:+.0%} against the median of the last "
                   f"{len(sizes)} good backups ({int(median)} bytes)")
    if not passed:
        description += (f"; beyond ±{tolerance:.0%}: check for a mass delete or load, or a table that was "
                        "dropped or added")
    return CheckOutcome("size", passed, description,
                        metadata={"bytes": manifest.plaintext_bytes, "median_bytes": int(median),
                                  "change": round(change, 4)})


# --- running them ----------------------------------------------------------------------------------

def good_backups(repo: Repository, keyring: Keyring, target: str,
                 known: KnownRecords | None = None) -> list[Manifest]:
    """The target's backups whose checks passed, oldest first (every manifest and record read)."""
    manifests, _ = list_backups(repo, keyring, target)
    known = known if known is not None else known_records(None, repo, keyring, target)
    return [m for m in manifests if check_status(repo, keyring, m, known).good]


def good_newest_first(repo: Repository, keyring: Keyring, target: str,
                      known: KnownRecords | None = None) -> Iterator[Manifest]:
    """The same, newest first, read only as far as the caller goes (`next(...)`: the newest good backup)."""
    known = known if known is not None else known_records(None, repo, keyring, target)
    return (m for m in newest_first(repo, keyring, target) if check_status(repo, keyring, m, known).good)


def unchecked_backups(repo: Repository, keyring: Keyring, target: str,
                      known: KnownRecords | None = None) -> list[Manifest]:
    """The target's backups no check record vouches for (never checked, checked in another version of the
    manifest, a record refused), oldest first: what `verify --unchecked` and the daily verification check."""
    manifests, _ = list_backups(repo, keyring, target)
    known = known if known is not None else known_records(None, repo, keyring, target)
    return [m for m in manifests if check_status(repo, keyring, m, known).status == "unchecked"]


def run_checks(policy: Policy, repo: Repository, keyring: Keyring, backup_id: str, *, jobs: int | None = None,
               trigger: dict[str, str] | None = None, progress: Progress | None = None,
               sample: ReadSample | None = None) -> CheckRecord:
    """Run every check on one backup and store the outcome as its checks.json (`progress`: bytes read back).
    `sample`: read only a random share of the objects in full, when the backup is good already (a backup is first
    made good by a full read: an unchecked or failed one is read whole whatever the sample says)."""
    if not valid_backup_id(backup_id) or not any(repo.list(backup_prefix(target_of(backup_id), backup_id))):
        raise UsageError(f"no backup {backup_id!r} in {repo.location} (nothing was checked or written)",
                         "run `regal-backup list` to see the backups")
    if being_deleted(repo, keyring, target_of(backup_id), backup_id):
        raise UsageError(f"backup {backup_id} is being deleted by prune (nothing was checked or written)",
                         "run `regal-backup prune` to finish the deletion a killed prune left")
    jobs = jobs or policy.jobs_for(target_of(backup_id))
    outcome, manifest = check_manifest(repo, keyring, backup_id)
    outcomes = [outcome]
    if manifest is None:
        kind = policy.target(target_of(backup_id)).kind
        outcomes += [CheckOutcome(name, False, "not run: the manifest cannot be read", outcome.failing_object)
                     for name in check_names(kind)[1:] if name != "key_cryptoperiod"]  # that one runs below
    else:
        if sample is not None and check_status(repo, keyring, manifest).status != "good":
            sample = None
        try:
            outcomes.append(check_integrity(repo, keyring, manifest, jobs, progress, sample))
        except (IntegrityError, RegalError) as exc:
            outcomes.append(CheckOutcome("integrity", False, exc.message))
        try:
            outcomes.append(check_encryption(repo, keyring, manifest, policy.checks.sample_kb * 1024))
        except RegalError as exc:  # an object that cannot be read cannot be shown to be encrypted
            outcomes.append(CheckOutcome("encryption", False, exc.message))
        earlier = (m for m in good_newest_first(repo, keyring, manifest.target) if m.started_at < manifest.started_at
                   and m.is_incremental == manifest.is_incremental)  # an incremental is compared with incrementals
        recent = list(itertools.islice(earlier, policy.checks.size_history))  # only these are read for size
        outcomes.append(check_size(manifest, recent[::-1], policy.checks.size_tolerance))
        outcomes += source_for(manifest.kind).kind_checks(policy, manifest.target, manifest,
                                                          itertools.chain(recent, earlier),  # read on as needed
                                                          trigger or {})
    outcomes.append(check_cryptoperiod(policy, keyring, datetime.now(UTC)))
    secondary = open_offsite(policy)
    if secondary is not None:
        if manifest is None:
            outcomes.append(CheckOutcome("offsite_copy", False, "not run: the manifest cannot be read"))
        else:
            try:
                outcomes.append(check_offsite(repo, secondary, manifest))
            except RegalError as exc:
                outcomes.append(CheckOutcome("offsite_copy", False, exc.message))
    record = CheckRecord(backup_id, datetime.now(UTC), outcomes, trigger or {},
                         manifest.fingerprint(keyring) if manifest else "")
    with next_record(policy, repo, keyring, target_of(backup_id), checks_key(backup_id), backup_id) as slot:
        record.sequence, record.previous = slot.sequence, slot.previous
        repo.put_bytes(checks_key(backup_id), record.to_bytes(keyring))
        slot.passed = record.passed
        audit.record(policy, repo, "verification", backup_id, "success" if record.passed else "failure",
                     {"checks": {o.name: o.passed for o in record.outcomes},
                      "failed": [f"{o.name}: {o.description}" for o in record.outcomes if not o.passed],
                      **{k: v for o in record.outcomes for k, v in o.metadata.get("audit", {}).items()},
                      **slot.audit_details}, trigger)
    if secondary is not None and manifest is not None:
        with contextlib.suppress(RegalError):  # the record travels with the copy, so a restore from there knows
            secondary.put_bytes(checks_key(backup_id), record.to_bytes(keyring))
    return record
