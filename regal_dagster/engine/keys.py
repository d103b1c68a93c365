"""The encryption keys' life: rotation, retirement (with re-encryption), and the inventory.

- `rotate_key`: a new key becomes primary; new backups use it, older ones stay readable with the old
  keys (Tink keeps every key of the keyset). The key check (`key_cryptoperiod`) measures how long the
  primary has been primary against the policy's cryptoperiod (PCI DSS 3.7.4).
- `retire_key`: destroys a key's material, only when no backup (and not the GDPR ledger) uses it; with
  `reencrypt`, first re-encrypts what does under the primary key: each object is decrypted and
  encrypted again (compressed bytes as they are), written under a new name, read back and checked
  against the manifest's SHA-256 of its content; then the backup's manifest names the new objects, the
  old ones go, the checks run again and the off-site copy is brought in step.
- `key_inventory`: every key ever held, with its dates and the backups using it (JSON for reports).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import tink

from .audit import audited
from .catalog import list_backups
from .checks import run_checks
from .crypto import OBJECT_HEADER, Keyring, load_keyring, save_keyring
from .errors import EncryptionKeyError, IntegrityError, KeyInUseError, ObjectLockedError
from .gdpr import load_ledger, save_ledger
from .layout import GDPR_LEDGER, KEYS_LOCK, LEDGER_LOCK, backup_prefix, manifest_key, target_of
from .manifest import Manifest, ObjectRecord
from .offsite import sync_backup
from .parallel import map_parallel
from .pipeline import CHUNK, StoredBytes, read_stream
from .policy import Policy
from .storage import Repository, open_offsite


def rotate_key(policy: Policy, repo: Repository | None = None) -> Keyring:
    """Add a new primary key (for objects, and one for documents). Returns the keyring as written.

    Under the repository's keys lock the keyset is read again, changed, written atomically and read back:
    two rotations at once both succeed, one after the other, and both keys stay."""
    from .storage import open_repository

    repo = repo or open_repository(policy)
    with audited(policy, repo, "key_rotate", "keyset") as details, repo.lock(KEYS_LOCK):
        keyring = load_keyring(policy)
        rotated = save_keyring(keyring.rotated())
        details.update(previous_key=keyring.primary_key_id, new_key=rotated.primary_key_id,
                       resource=f"key {rotated.primary_key_id}")
    return rotated


def key_usage(repo: Repository, policy: Policy, keyring: Keyring,
              manifests: list[Manifest] | None = None) -> dict[int, list[str]]:
    """key id -> the backups (ids) with at least one object encrypted with it; the ledger as 'gdpr-ledger'.
    `manifests`: every backup's, when the caller has read them already."""
    usage: dict[int, list[str]] = {}
    if manifests is None:
        manifests = [m for target in sorted(policy.targets) for m in list_backups(repo, keyring, target)[0]]
    for manifest in manifests:
        for key_id in sorted({o.encryption.key_id for o in manifest.objects}):
            usage.setdefault(key_id, []).append(manifest.backup_id)
    ledger_key = object_key_id(repo, GDPR_LEDGER)
    if ledger_key is not None:
        usage.setdefault(ledger_key, []).append("gdpr-ledger")
    return usage


def object_key_id(repo: Repository, key: str) -> int | None:
    if repo.size(key) is None:
        return None
    _, _, key_id = OBJECT_HEADER.unpack(repo.read_range(key, 0, OBJECT_HEADER.size))
    return int(key_id)


def key_inventory(policy: Policy, repo: Repository, keyring: Keyring | None = None,
                  manifests: list[Manifest] | None = None) -> list[dict[str, Any]]:
    """Every key the keyset ever held, oldest first, with the backups that use it."""
    keyring = keyring or load_keyring(policy)
    usage = key_usage(repo, policy, keyring, manifests)
    period = policy.encryption.cryptoperiod
    return [{"key_id": k.key_id, **k.to_json(), "primary": k.primary,
             "status": "retired" if k.retired_at else "primary" if k.primary else "decrypt-only",
             "cryptoperiod_days": period.days, "backups": [b for b in usage.get(k.key_id, []) if b != "gdpr-ledger"],
             "gdpr_ledger": "gdpr-ledger" in usage.get(k.key_id, [])}
            for k in keyring.all_keys()]


@dataclass
class RetireReport:
    key_id: int
    reencrypted: list[str] = field(default_factory=list)  # backup ids
    locked_leftovers: list[str] = field(default_factory=list)  # old objects Object Lock keeps until their date
    ledger_reencrypted: bool = False


def retire_key(policy: Policy, key_id: int, *, reencrypt: bool = False, repo: Repository | None = None) -> RetireReport:
    from .storage import open_repository

    repo = repo or open_repository(policy)
    with audited(policy, repo, "key_retire", f"key {key_id}") as details:
        report = _retire(policy, repo, key_id, reencrypt)
        details.update(reencrypted=report.reencrypted, ledger_reencrypted=report.ledger_reencrypted,
                       locked_leftovers=len(report.locked_leftovers))
    return report


def _retire(policy: Policy, repo: Repository, key_id: int, reencrypt: bool) -> RetireReport:
    report = RetireReport(key_id)
    with contextlib.ExitStack() as locks:  # no backup, erasure or other key operation meanwhile
        for name in [*sorted(policy.targets), LEDGER_LOCK, KEYS_LOCK]:
            locks.enter_context(repo.lock(name))
        keyring = load_keyring(policy)  # read under the lock: as another rotation or retirement left it
        if key_id not in keyring.history:
            raise EncryptionKeyError(f"the keyset has no key {key_id}", "`regal-backup keys list` shows the keys")
        if keyring.history[key_id].retired_at:
            raise EncryptionKeyError(f"key {key_id} was retired at {keyring.history[key_id].retired_at}",
                                     "nothing to do")
        if key_id == keyring.primary_key_id:
            raise KeyInUseError(f"key {key_id} is the primary key: new backups use it",
                                     "run `regal-backup keys rotate` first, then retire it")
        users = key_usage(repo, policy, keyring).get(key_id, [])
        if users and not reencrypt:
            shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
            raise KeyInUseError(f"key {key_id} still encrypts {len(users)} item(s): {shown}",
                                     "add --reencrypt to re-encrypt them under the primary key first, or wait "
                                     "until retention prunes them")
        secondary = open_offsite(policy)
        for backup_id in users:
            if backup_id == "gdpr-ledger":
                save_ledger(repo, keyring, load_ledger(repo, keyring))
                report.ledger_reencrypted = True
                continue
            key = manifest_key(target_of(backup_id), backup_id)
            manifest = Manifest.from_bytes(repo.get_bytes(key), key, keyring)
            rekeyed, leftovers = rekey_backup(repo, keyring, manifest, key_id, policy.jobs)
            report.reencrypted.append(backup_id)
            report.locked_leftovers += leftovers
            run_checks(policy, repo, keyring, backup_id, trigger={"cli": f"keys retire {key_id}"})
            if secondary is not None:
                sync_backup(repo, secondary, rekeyed)
        if key_usage(repo, policy, keyring).get(key_id):
            raise EncryptionKeyError(f"key {key_id} is still in use after re-encryption", "run the command again")
        save_keyring(keyring.without(key_id))
    return report


def rekey_backup(repo: Repository, keyring: Keyring, manifest: Manifest, key_id: int,
                 jobs: int) -> tuple[Manifest, list[str]]:
    """Re-encrypt the objects of a backup that use `key_id` under the primary key; returns the new manifest
    and the old objects Object Lock would not let go."""
    old = [r for r in manifest.objects if r.encryption.key_id == key_id]
    try:  # several objects at once: each is CPU-bound (AES-GCM both ways, SHA-256, zstd to check)
        fresh = dict(zip([r.name for r in old], map_parallel(
            lambda record, _cancelled: reencrypt_object(repo, keyring, manifest, record), old,
            jobs, "rekey"), strict=True))
    except BaseException:  # the backup stays as it was: its manifest still names the old objects
        for record in old:
            with contextlib.suppress(Exception):
                repo.delete(rekeyed_key(manifest, record, keyring.primary_key_id))
        raise
    document = manifest.model_dump(mode="json")
    document["objects"] = [(fresh.get(r.name) or r).model_dump(mode="json") for r in manifest.objects]
    document["rekeyed"] = [*document.get("rekeyed", []),
                           {"from_key": key_id, "to_key": keyring.primary_key_id, "objects": len(old)}]
    rekeyed = Manifest.model_validate(document)
    repo.put_bytes(manifest_key(manifest.target, manifest.backup_id), rekeyed.to_bytes(keyring), manifest.locked_until)
    leftovers = []
    for record in old:
        try:
            repo.delete(record.key)
        except ObjectLockedError:
            leftovers.append(record.key)  # unreadable once the key is gone; prune removes it after its date
    return rekeyed, leftovers


def rekeyed_key(manifest: Manifest, record: ObjectRecord, key_id: int) -> str:
    return f"{backup_prefix(manifest.target, manifest.backup_id)}{record.name}.k{key_id}"


def reencrypt_object(repo: Repository, keyring: Keyring, manifest: Manifest, record: ObjectRecord) -> ObjectRecord:
    """Decrypt one object and encrypt it again under the primary key, as a new object; read it back."""
    new_key = rekeyed_key(manifest, record, keyring.primary_key_id)
    with repo.reader(record.key) as source, repo.writer(new_key, manifest.locked_until) as writer:
        stored = StoredBytes(writer)
        try:
            plaintext = keyring.decrypting_stream(source, manifest.backup_id, record.name,
                                                  expected_key_id=record.encryption.key_id)
            encrypted = keyring.encrypting_stream(stored, manifest.backup_id, record.name)
            while chunk := plaintext.read(CHUNK):
                encrypted.write(chunk)
            encrypted.close()
        except tink.TinkError:
            if stored.failure is not None:  # the store's error (a full disk), not a damaged object
                raise stored.failure from None
            raise IntegrityError(f"object {record.key} fails authentication: it cannot be re-encrypted",
                                 "verify the backup; a damaged backup cannot be re-keyed (prune it instead)") from None
    fresh = record.model_copy(update={
        "key": new_key, "size": stored.size, "stored_sha256": stored.sha256.hexdigest(),
        "encryption": record.encryption.model_copy(update={"key_id": keyring.primary_key_id})})
    read_stream(repo, fresh, keyring=keyring, backup_id=manifest.backup_id)  # every byte, both SHA-256 sums
    return fresh
