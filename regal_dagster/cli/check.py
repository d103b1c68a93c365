"""`regal-backup check`: the pre-flight checks (engine/preflight.py), one line each, the fix under a failure."""

from __future__ import annotations

import argparse

from .context import load_policy_of
from .output import Output


def cmd_check(args: argparse.Namespace, out: Output) -> int:
    from ..engine.preflight import run_preflight

    policy = load_policy_of(args)
    targets = [args.target] if args.target else sorted(policy.targets)
    for name in targets:
        policy.target(name)  # an unknown target is a usage error before anything is checked
    with out.activity("checking"):
        findings = run_preflight(policy, targets)
    failed = [f for f in findings if not f.passed and f.required]
    warned = [f for f in findings if not f.passed and not f.required]
    width = max(len(f.subject) for f in findings)
    lines = []
    for f in findings:
        verdict = "OK  " if f.passed else "FAIL" if f.required else "WARN"
        lines.append(f"{verdict} {f.subject:{width}}  {f.check}: {f.detail}")
        if not f.passed and f.fix:
            lines.append(f"     {'':{width}}  what to do: {f.fix}")
    lines.append((f"{len(findings) - len(failed) - len(warned)} of {len(findings)} checks passed" if failed or warned
                  else f"all {len(findings)} checks passed") + (f", {len(warned)} warning(s)" if warned else ""))
    out.result({"passed": not failed, "findings": [f.to_json() for f in findings]}, "\n".join(lines))
    return 1 if failed else 0
