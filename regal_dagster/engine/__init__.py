"""The backup engine: plain Python, no Dagster imports. Imports point downwards (tests/test_architecture.py).

Below the plug-ins:
  errors, transport, settings   error types, how a connection travels, the value types and the configuration
                fragments the plug-ins need (durations, crons, retry, compression, keys, repository basics)
  layout        every repository path and name, in one place
  units         how durations and sizes are written for people (the CLI's progress and results, summaries)
  crypto, documents, manifest, pipeline   Tink keysets, sealed documents, what a backup is, the one write
                and read path of every object (stream -> zstd -> AEAD -> SHA-256 -> store, and back)
The plug-ins, each found by a registry:
  storage/      object stores: one module per backend with its own repository settings (local, s3)
  sources/      one folder per kind (postgres, postgres_cluster, redis, terraform, config, files), owning its
                capture, checks, restore and restore test; optional capabilities (sources/capabilities.py: a
                continuous archive) live in the kind's folder (postgres_cluster/wal*, pitr)
  channels/     alert channels, one module each (settings + sender)
policy          assembles the policy file from the fragments and the registries
The verbs, each calling the kinds through the registry:
  backup, verify, checks, restore, restore_test, drill, retention, keys, offsite, gdpr, audit, alerts,
  metrics, status, upgrade, bootstrap (init)
  compliance/   the report: evidence, controls, frameworks/ (one module each, found by a registry),
                rendering, OSCAL
"""
