"""README.md opens with the two commands a newcomer runs; CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_demo_and_test_commands_and_ci_runs_the_test_command() -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert demo.endswith("regal-backup demo")
    assert tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_readme_stands_alone_and_says_what_the_tests_need() -> None:
    """A clone has no ../shared: the README links nothing outside the repository, and names the services the
    tests talk to; every docs/ file it names exists."""
    text = (ROOT / "README.md").read_text()
    assert "../" not in text
    for need in ("127.0.0.1:5432", "redis-server", "git"):
        assert need in text
    for name in re.findall(r"docs/[\w.-]+", text):
        assert (ROOT / name).exists(), name


def test_every_path_the_readme_names_exists_in_the_tree() -> None:
    """The layout and docs the README points a newcomer to are there (a `<placeholder>` matches any name)."""
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(?<![\w./-])((?:regal_dagster|docs|tests|benchmarks|reports|\.ci)/[\w./<>*-]*[\w/])",
                           text))
    assert len(named) > 10, named  # the pattern still finds the README's paths
    missing = [path for path in sorted(named) if not list(ROOT.glob(re.sub(r"<[^>]+>", "*", path).rstrip("/")))]
    assert not missing, missing
