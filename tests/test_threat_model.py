"""Every sentence of the threat model in docs/formats.md names the test that proves it, and every test it
names exists (issue 27: "every sentence of it has a test"). Lead-ins (a line ending with a colon) say who the
attacker is; each sentence below says what they can or cannot do, and ends with `[tests/FILE.py::TEST]` (one
or more)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"\[(tests/[\w/]+\.py)::(\w+)\]")


def threat_model() -> str:
    text = (ROOT / "docs" / "formats.md").read_text()
    start = text.index("\n## Threat model\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


def sentences(section: str) -> list[str]:
    """The section's sentences: headings and blank lines dropped, bullets and paragraphs joined, split after
    a full stop (not inside a citation or a file name)."""
    found = []
    blocks = re.split(r"\n\s*\n|\n(?=- )", section)
    for block in blocks:
        block = " ".join(line.strip() for line in block.splitlines() if not line.startswith("#")).strip()
        block = block.removeprefix("- ").strip()
        if block and not block.endswith(":"):  # a lead-in ("**Who** ... can:") introduces the claims below it
            found += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z*`(])", block) if s.strip()]
    return found


def test_every_sentence_of_the_threat_model_cites_a_test() -> None:
    uncited = [s for s in sentences(threat_model()) if not CITATION.search(s)]
    assert uncited == [], "\n".join(uncited)


def test_every_cited_test_exists() -> None:
    cited = CITATION.findall(threat_model())
    assert len(cited) >= 20
    missing = [f"{file}::{name}" for file, name in set(cited) if not (ROOT / file).is_file()
               or not re.search(rf"^def {name}\(", (ROOT / file).read_text(), re.MULTILINE)]
    assert missing == [], missing
