"""CI's dependency audit: pip-audit over the packages installed in the virtual environment (what
requirements*.txt resolved to), asking PyPI's vulnerability data first and OSV's next.

Exits 1 when a known vulnerability is found (each one printed with the versions that fix it), or when
pip-audit fails for a reason other than the network. Exits 0 when nothing is found, and also when no
vulnerability database can be reached, saying so: then the audit did not happen, which is not a pass of
it. "Reached" means the database answered for at least one package (a mirror of PyPI without its JSON
API answers "not found" for every one).

Usage: python .ci/audit_dependencies.py [COMMAND...]; COMMAND (default: this Python's pip-audit) is what
runs pip-audit, and is given its options.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

SERVICES = ("pypi", "osv")
# The virtual environment's installer (python -m venv brings its own): not a dependency of the console.
NOT_DEPENDENCIES = {"pip"}
NETWORK_FAILURE = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|Max retries exceeded|NameResolutionError|"
    r"Name or service not known|Temporary failure in name resolution|Connection refused|"
    r"Network is unreachable|timed out",
)


class Unreachable(Exception):
    """The vulnerability service did not answer for any package."""


def audit(command: list[str], service: str) -> list[dict]:
    """The packages ``service`` answered for, each with its ``vulns``. ``Unreachable`` when it answered
    for none; SystemExit(1) when pip-audit failed otherwise."""
    run = subprocess.run([*command, "--vulnerability-service", service, "--format", "json",
                          "--progress-spinner", "off"], capture_output=True, text=True, timeout=1800)
    try:
        dependencies = json.loads(run.stdout)["dependencies"]
    except (ValueError, KeyError, TypeError):
        if NETWORK_FAILURE.search(run.stderr):
            raise Unreachable(run.stderr.strip().splitlines()[-1]) from None
        print(f"dependency audit: pip-audit failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        raise SystemExit(1) from None
    audited = [d for d in dependencies if "skip_reason" not in d]
    if not audited:
        raise Unreachable(dependencies[0]["skip_reason"] if dependencies else "no package to audit")
    return audited


def main(argv: list[str]) -> int:
    command = argv or [sys.executable, "-m", "pip_audit"]
    unreachable = []
    for service in SERVICES:
        try:
            audited = audit(command, service)
        except Unreachable as exc:
            unreachable.append(f"{service}: {exc}")
            continue
        found = [(dependency, vuln) for dependency in audited if dependency["name"] not in NOT_DEPENDENCIES
                 for vuln in dependency.get("vulns", ())]
        for dependency, vuln in found:
            fixed = ", ".join(vuln.get("fix_versions") or ()) or "no fixed version yet"
            aliases = ", ".join(vuln.get("aliases") or ())
            print(f"VULNERABLE {dependency['name']} {dependency['version']}: {vuln['id']}"
                  f"{f' ({aliases})' if aliases else ''}; fixed in {fixed}")
        if found:
            print(f"dependency audit ({service}): {len(found)} known vulnerabilities; raise the floors in "
                  "requirements*.txt above them")
            return 1
        print(f"dependency audit ({service}): no known vulnerability in the {len(audited)} packages audited")
        return 0
    print("dependency audit SKIPPED: no vulnerability database could be reached, so nothing was checked ("
          + "; ".join(unreachable) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
