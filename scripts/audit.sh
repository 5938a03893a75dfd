#!/usr/bin/env bash
# Dependency audit (pip-audit over the project's virtual environment), run by CI after the tests.
# Fails when an installed package has a published advisory WITH a fixed release (upgrade it); advisories
# without a fix, and an audit that cannot reach the advisory database, are printed as warnings only.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${T2I_REWARD_VENV:-.venv}
tool=${T2I_AUDIT_VENV:-/tmp/t2i-pip-audit}
if [ ! -x "$tool/bin/pip-audit" ]; then
    python3 -m venv "$tool" && "$tool/bin/python" -m pip install -q pip-audit 2>/dev/null || { echo "WARNING: pip-audit could not be installed; audit skipped"; exit 0; }
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
report=$(mktemp)
if ! "$tool/bin/pip-audit" --path "$site" --skip-editable -f json -o "$report" >/dev/null 2>"$report.err"; then
    if [ ! -s "$report" ]; then echo "WARNING: pip-audit did not run: $(tail -1 "$report.err")"; exit 0; fi
fi
"$tool/bin/python" - "$report" <<'PY'
import json, sys
deps = json.load(open(sys.argv[1]))["dependencies"]
fixable, unfixed = [], []
for d in deps:
    for v in d.get("vulns", []):
        line = f"{d['name']} {d['version']}: {v['id']} (fixed in: {', '.join(v['fix_versions']) or 'no release yet'})"
        (fixable if v["fix_versions"] else unfixed).append(line)
for line in unfixed:
    print("WARNING (no fix released):", line)
for line in fixable:
    print("VULNERABLE (upgrade):", line)
print(f"pip-audit: {len(deps)} packages, {len(fixable)} fixable and {len(unfixed)} unfixed advisories")
sys.exit(1 if fixable else 0)
PY
