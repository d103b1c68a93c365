"""How the CLI speaks: human text on a terminal, or one JSON document with --json; a progress bar only
on a terminal; sizes for people."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..engine.manifest import Manifest
from ..engine.pipeline import Progress
from ..engine.sources.registry import source_for


class Output:
    """Human text on a terminal, or one JSON document with --json."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def result(self, payload: Any, text: str) -> None:
        if self.as_json:
            print(json.dumps(payload, indent=2, default=str))
        else:
            print(text)

    def progress(self, description: str) -> _ProgressBar:
        return _ProgressBar(description, enabled=not self.as_json and sys.stderr.isatty())


class _ProgressBar:
    def __init__(self, description: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def __enter__(self) -> Progress | None:
        bar = self.bar
        if bar is None:
            return None

        def advance(n: int) -> None:
            bar.update(n)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def manifest_summary(m: Manifest) -> dict[str, Any]:
    return {
        "backup_id": m.backup_id, "target": m.target, "kind": m.kind, "retention_class": m.retention_class,
        "started_at": m.started_at.isoformat(), "finished_at": m.finished_at.isoformat(),
        "duration_seconds": round(m.duration_seconds, 3), "bytes_read": m.plaintext_bytes,
        "bytes_stored": m.stored_bytes, "key_id": m.objects[0].encryption.key_id if m.objects else None,
        "tables": len(m.source.get("tables", [])), "rows": sum(m.table_rows().values()),
        "retain_until": m.retain_until.isoformat(), **source_for(m.kind).summary(m),
    }


