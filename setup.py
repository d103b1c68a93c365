"""Packaging that pyproject.toml cannot express: the top-level `reports/` directory is the package
`regal_dagster.reports` (the auditor templates live at the top of the repository and ship inside the wheel).
Everything else (metadata, dependencies, package data) is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["regal_dagster", "regal_dagster.*"]), "regal_dagster.reports"],
    package_dir={"regal_dagster.reports": "reports"},
)
