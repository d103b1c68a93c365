"""The backup engine: plain Python, no Dagster imports.

Modules, one reason to change each:
  policy      the validated policy file (targets, RPO/RTO, schedules, retention, repository, keys)
  repository  object stores (local filesystem, S3), locks
  crypto      Tink streaming AEAD envelope encryption and the keyset
  manifest    the manifest format (what a backup is)
  pipeline    the write and read paths: stream -> zstd -> AEAD -> SHA-256 -> store, and back
  sources/    PostgreSQL dump and restore
  backup, verify, restore, catalog   the operations
"""
