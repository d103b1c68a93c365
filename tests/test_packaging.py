"""The wheel is what a production host installs: built from this tree and installed into a fresh venv, it
renders a real compliance report from there, because the auditor templates travel inside it.

The fresh venv takes its third-party dependencies from the project's venv (a .pth file naming that venv's
site-packages, whose own .pth files, among them the editable-install finder, are not processed from
there); regal_dagster itself comes from the wheel, and the test proves it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from datetime import datetime
from pathlib import Path

import pdfplumber
import pytest
import yaml
from pypdf import PdfReader

from .conftest import DatabaseFactory, load_awkward_data

ROOT = Path(__file__).resolve().parents[1]
SCRATCH = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".*_cache", ".regal-demo")


def _not_source(directory: str, names: list[str]) -> set[str]:
    """What a copy of the tree leaves out: caches, venvs, earlier builds and benchmark results."""
    top_level = {"build", "dist"} if Path(directory) == ROOT else set()
    benchmark_results = {"results"} if Path(directory) == ROOT / "benchmarks" else set()
    return set(SCRATCH(directory, names)) | (top_level | benchmark_results) & set(names)


def _run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=180, check=False)
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the tree (the build's scratch never lands in the working tree)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=_not_source)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         source, "-w", work / "dist", cwd=work)
    (built,) = (work / "dist").glob("regal_backup-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; the other dependencies seen through the project venv."""
    home = tmp_path_factory.mktemp("venv") / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", home, cwd=home.parent)
    python = home / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                        cwd=home.parent).stdout.strip())
    (purelib / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel,
         cwd=home.parent)
    return home


# Run by the venv's python: where regal_dagster and its templates come from, and the renderer's fetch rule
# there (its own stylesheet is fetched; the package's code beside the templates and the web are refused).
PROBE = """
import json, regal_dagster, regal_dagster.engine.compliance.rendering as report
fetcher, fetched = report._fetcher(), []
for url in ((report.TEMPLATES / "report.css").as_uri(), (report.TEMPLATES.parent / "__init__.py").as_uri(),
            "http://127.0.0.1:9/tracker.png"):
    try:
        fetcher.fetch(url).close()
        fetched.append(url.rsplit("/", 1)[-1])
    except ValueError:
        pass
print(json.dumps({"package": regal_dagster.__file__, "templates": str(report.TEMPLATES), "fetched": fetched,
                  "refused": len(fetcher.refused)}))
"""


def _isolated_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def test_the_wheel_carries_the_templates_and_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())

    assert {"regal_dagster/reports/__init__.py", "regal_dagster/reports/compliance_report.html",
            "regal_dagster/reports/report.css"} <= names
    assert not [n for n in names if n.endswith(".png")]  # the example pages stay in the repository
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "regal_dagster").rglob("*.py")}
    assert modules and not modules - names  # no package of the tree is left out of the wheel


def test_the_installed_wheel_renders_a_compliance_report(venv: Path, system_pg: DatabaseFactory,
                                                         tmp_path: Path) -> None:
    env = _isolated_env(venv)
    probe = json.loads(_run(venv / "bin" / "python", "-c", PROBE, cwd=tmp_path, env=env).stdout)
    for path in (probe["package"], probe["templates"]):  # the venv's own site-packages, not this source tree
        assert Path(path).is_relative_to(venv.resolve()) and not Path(path).is_relative_to(ROOT), probe
    assert probe["fetched"] == ["report.css"] and probe["refused"] == 2  # only the templates' own files

    source = system_pg.create()
    load_awkward_data(source)
    audit_db = system_pg.create("regal_audit")
    cli = venv / "bin" / "regal-backup"
    made = json.loads(_run(cli, "init", tmp_path / "regal", "--postgres-dsn", source, "--json",
                           cwd=tmp_path, env=env).stdout)
    policy_file = Path(made["policy"])
    document = yaml.safe_load(policy_file.read_text())
    document["audit"] = {"dsn": audit_db}
    policy_file.write_text(yaml.safe_dump(document))
    backup = json.loads(_run(cli, "backup", "main", "--json", "--policy", policy_file, cwd=tmp_path, env=env).stdout)

    period = f"{datetime.fromisoformat(backup['finished_at']):%Y-%m}"  # the backup's month, even at midnight
    pdf_path = tmp_path / "report.pdf"
    report = json.loads(_run(cli, "report", "--period", period, "--output", pdf_path, "--json",
                             "--policy", policy_file, cwd=tmp_path, env=env).stdout)

    assert report["chain_ok"] is True
    assert pdf_path.read_bytes().startswith(b"%PDF-")
    reader = PdfReader(pdf_path)
    assert reader.metadata is not None and reader.metadata.title == f"Regal Backup compliance report {period}"
    with pdfplumber.open(pdf_path) as pdf:
        text = "\n".join(page.extract_text() or "" for page in pdf.pages)
    assert "Backup and recovery compliance report" in text and period in text
    (backups_csv,) = reader.attachments["backups.csv"]
    assert backup["backup_id"] in backups_csv.decode()  # and in the evidence attached to the PDF
