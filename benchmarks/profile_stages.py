"""Where the time of a backup, a verify and a restore goes: CPU per process and per pipeline stage.

    .venv/bin/python benchmarks/profile_stages.py --scale 20
    .venv/bin/python benchmarks/profile_stages.py --dsn postgresql://user@host/db

It backs up the database (a generated one in a scratch PostgreSQL 18, or `--dsn`), restores it into a
new database, and prints three tables:

1. CPU seconds by process for backup, verify and restore: this process (the pipeline), its children
   (psql, pg_dump, pg_restore) and everything else on the machine during the step (the PostgreSQL
   server), against wall time and the machine's core count: a step at cores x wall is CPU-bound.
2. CPU seconds of each pipeline stage, timed alone, single-threaded, over the backup's own table data
   (read back from the repository): SHA-256, row counting, zstd compress and decompress, Tink.
3. The restore's phases.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import zstandard
from common import generated_database

from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.catalog import load_manifest
from regal_dagster.engine.crypto import NonClosingWriter, load_keyring
from regal_dagster.engine.pipeline import read_stream
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.postgresql.connection import with_dbname
from regal_dagster.engine.sources.postgres.restore import restore_database
from regal_dagster.engine.storage import open_repository
from regal_dagster.engine.verify import verify_backup


def machine_cpu() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


@contextmanager
def cpu_account(rows: list[tuple[str, float, float, float, float]], name: str) -> Iterator[None]:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    machine, start = machine_cpu(), time.monotonic()
    yield
    wall = time.monotonic() - start
    own2, kids2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    this = own2.ru_utime + own2.ru_stime - own.ru_utime - own.ru_stime
    children = kids2.ru_utime + kids2.ru_stime - kids.ru_utime - kids.ru_stime
    rows.append((name, wall, this, children, machine_cpu() - machine - this - children))


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def stage_costs(policy_path: Path, backup_id: str) -> list[tuple[str, float, float]]:
    """(stage, CPU seconds, MB/s) for each stage over the backup's table objects, one thread."""
    policy = load_policy(policy_path)
    repo, keyring = open_repository(policy), load_keyring(policy)
    manifest = load_manifest(repo, keyring, backup_id)
    params = zstandard.ZstdCompressionParameters.from_level(policy.compression.level,
                                                            hash_log=policy.compression.hash_log or 0)
    totals: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], object]) -> object:
        start = time.thread_time()
        result = fn()
        totals[stage] = totals.get(stage, 0.0) + time.thread_time() - start
        return result

    def profile(name: str, plaintext: bytes) -> None:
        timed("SHA-256 of the plaintext", lambda: hashlib.sha256(plaintext).digest())
        timed("row counting (newlines)", lambda: plaintext.count(b"\n"))
        compressed = timed("zstd compress (policy level)",
                           lambda: zstandard.ZstdCompressor(compression_params=params).compress(plaintext))
        timed("zstd decompress", lambda: zstandard.ZstdDecompressor().decompress(compressed))  # type: ignore[arg-type]

        def encrypt() -> None:
            stream = keyring.encrypting_stream(NonClosingWriter(_Discard()), manifest.backup_id, name)  # type: ignore[arg-type]
            stream.write(compressed)
            stream.close()

        timed("Tink AES-GCM encrypt (compressed bytes)", encrypt)

    plain_bytes = 0
    for record in manifest.objects:
        if record.name.startswith("tables/"):
            chunks: list[bytes] = []
            read_stream(repo, record, keyring=keyring, backup_id=manifest.backup_id, sink=chunks.append)
            plaintext = b"".join(chunks)
            chunks.clear()
            plain_bytes += len(plaintext)
            profile(record.name, plaintext)
    return [(stage, seconds, plain_bytes / seconds / 1e6) for stage, seconds in totals.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--dsn")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    rows: list[tuple[str, float, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="regal-profile-") as tmp, contextlib.ExitStack() as stack:
        dsn = args.dsn
        if not dsn:
            dsn = stack.enter_context(generated_database(Path(tmp), args.scale))
        made = init_project(Path(tmp) / "regal", dsn)
        policy = load_policy(made.policy_path)
        with cpu_account(rows, "backup"):
            manifest = run_backup(policy, "main").manifest
        repo, keyring = open_repository(policy), load_keyring(policy)
        with cpu_account(rows, "verify"):
            verify_backup(repo, keyring, manifest, jobs=2 * args.jobs)
        restored = with_dbname(dsn, f"regal_profile_{os.getpid()}")
        with cpu_account(rows, "restore"):
            report = restore_database(repo, keyring, manifest, restored, jobs=args.jobs)
        with psycopg.connect(with_dbname(dsn, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "regal_profile_{os.getpid()}" WITH (FORCE)')
        stages = stage_costs(made.policy_path, manifest.backup_id)

    cores = os.cpu_count() or 1
    print(f"\n### CPU by process ({manifest.plaintext_bytes / 1e6:,.0f} MB of dump text, {cores} cores)\n")
    print("| step | wall s | pipeline (this process) | psql / pg_dump / pg_restore | server and rest | busy cores |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, this, children, rest in rows:
        print(f"| {name} | {wall:.2f} | {this:.2f} | {children:.2f} | {rest:.2f} | "
              f"{(this + children + rest) / wall:.2f} |")
    print("\n### pipeline stages, one thread each, over the same table data\n")
    print("| stage | CPU s | MB/s of plaintext |")
    print("|---|---:|---:|")
    for stage, seconds, rate in stages:
        print(f"| {stage} | {seconds:.2f} | {rate:,.0f} |")
    print("\n### restore phases (s)\n")
    print("| " + " | ".join(report.seconds) + " |")
    print("|" + "---:|" * len(report.seconds))
    print("| " + " | ".join(f"{s:.2f}" for s in report.seconds.values()) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
