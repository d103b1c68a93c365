"""The auditor-facing templates, shipped as the package `regal_dagster.reports`.

This directory stays at the top of the repository (where auditors and reviewers look for it); packaging maps
the package name onto it (setup.py `package_dir`), so a wheel carries the `.html` and `.css` files and
`engine/compliance/rendering.py` finds them with `importlib.resources`, installed or editable alike.
"""
