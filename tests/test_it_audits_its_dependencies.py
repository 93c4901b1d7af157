"""CI audits the installed dependencies with pip-audit (.ci/audit_dependencies.py, run by .ci/run): a
known vulnerability fails the build, naming the package, the advisory and the fixed versions; a
vulnerability database that cannot be reached (no network, or a PyPI mirror without its JSON API that
answers "not found" for every package) does not, and the audit says it was skipped; pip-audit failing
for another reason fails the build. The script is run as CI runs it, with pip-audit replaced by a
stand-in that answers as each service would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / ".ci" / "audit_dependencies.py"
STAND_IN = """import json, sys
answers = json.load(open(sys.argv[1]))
service = sys.argv[sys.argv.index("--vulnerability-service") + 1]
answer = answers[service]
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("exit", 0))
"""


def report(dependencies: list[dict], exit: int = 0) -> dict:
    """What pip-audit answers with ``--format json``: exit 1 when it found vulnerabilities."""
    return {"stdout": json.dumps({"dependencies": dependencies, "fixes": []}), "exit": exit}


NOT_FOUND = "Dependency not found on PyPI and could not be audited"
NOT_ON_PYPI = report([  # a mirror of PyPI without its JSON API
    {"name": "django", "skip_reason": f"{NOT_FOUND}: django (5.2.19)"},
    {"name": "daphne", "skip_reason": f"{NOT_FOUND}: daphne (4.2.3)"},
])
NO_NETWORK = {"exit": 1, "stderr": "Traceback (most recent call last):\n  ...\nrequests.exceptions."
              "ConnectionError: HTTPSConnectionPool(host='api.osv.dev', port=443): Max retries exceeded"}
CLEAN = report([{"name": "django", "version": "5.2.19", "vulns": []},
                {"name": "torch", "skip_reason": "Dependency not found on PyPI: torch (2.13.0+cpu)"}])
DJANGO_5_2 = report([
    {"name": "django", "version": "5.2", "vulns": [
        {"id": "PYSEC-2025-37", "fix_versions": ["4.2.21", "5.1.9", "5.2.1"], "aliases": ["CVE-2025-32873"],
         "description": "Denial-of-service possibility in strip_tags()"}]},
    {"name": "pip", "version": "23.2.1", "vulns": [{"id": "PYSEC-2023-228", "fix_versions": ["23.3"]}]},
    {"name": "daphne", "version": "4.2.3", "vulns": []},
], exit=1)
OLD_PIP_ONLY = report([{"name": "pip", "version": "23.2.1", "vulns": [{"id": "PYSEC-2023-228"}]},
                       {"name": "django", "version": "5.2.19", "vulns": []}], exit=1)


def run_audit(tmp_path, pypi: dict, osv: dict) -> subprocess.CompletedProcess:
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"pypi": pypi, "osv": osv}))
    stand_in = tmp_path / "pip_audit_stand_in.py"
    stand_in.write_text(STAND_IN)
    return subprocess.run([sys.executable, str(SCRIPT), sys.executable, str(stand_in), str(answers)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_a_known_vulnerability_fails_the_build_naming_it(tmp_path):
    audit = run_audit(tmp_path, DJANGO_5_2, CLEAN)
    assert audit.returncode == 1, audit.stdout + audit.stderr
    assert ("VULNERABLE django 5.2: PYSEC-2025-37 (CVE-2025-32873); fixed in 4.2.21, 5.1.9, 5.2.1"
            in audit.stdout)
    assert "pip" not in audit.stdout.replace("pip-audit", "")  # the venv's installer is not a dependency


def test_the_virtual_environments_own_pip_is_no_dependency(tmp_path):
    audit = run_audit(tmp_path, OLD_PIP_ONLY, CLEAN)
    assert audit.returncode == 0 and "in the 2 packages audited" in audit.stdout, audit.stdout


def test_an_unreachable_database_is_said_and_passes(tmp_path):
    audit = run_audit(tmp_path, NOT_ON_PYPI, NO_NETWORK)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "dependency audit SKIPPED: no vulnerability database could be reached" in audit.stdout
    assert "Dependency not found on PyPI" in audit.stdout and "Max retries exceeded" in audit.stdout


def test_osv_is_asked_when_pypi_cannot_answer(tmp_path):
    audit = run_audit(tmp_path, NOT_ON_PYPI, DJANGO_5_2)
    assert audit.returncode == 1 and "VULNERABLE django 5.2" in audit.stdout
    audit = run_audit(tmp_path, NOT_ON_PYPI, CLEAN)
    assert audit.returncode == 0 and "audit (osv): no known vulnerability in the 1 packages" in audit.stdout


def test_a_clean_audit_passes(tmp_path):
    audit = run_audit(tmp_path, CLEAN, NO_NETWORK)
    assert audit.returncode == 0 and "audit (pypi): no known vulnerability in the 1 packages" in audit.stdout


@pytest.mark.parametrize("stderr", ["pip-audit: error: unrecognized arguments: --frobnicate",
                                    "Traceback ...\nKeyError: 'dependencies'"])
def test_pip_audit_failing_otherwise_fails_the_build(tmp_path, stderr):
    audit = run_audit(tmp_path, {"exit": 2, "stderr": stderr}, CLEAN)
    assert audit.returncode == 1 and "pip-audit failed (exit 2)" in audit.stdout, audit.stdout
