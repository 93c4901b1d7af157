"""The layers hold, checked by import-linter (the contracts in .importlinter, also run by `make lint`):
fdconsole above gpu_worker above scheduler; scheduler imports neither Django nor torch; gpu_worker
imports no Django; and no two modules import each other, directly or around a circle."""

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"


def test_the_contracts_are_the_layers_the_core_and_no_circles():
    config = configparser.ConfigParser()
    config.read(CONFIG)
    sections = [config[s] for s in config.sections() if s.startswith("importlinter:contract")]
    contracts = {section["type"]: section for section in sections}
    assert contracts["layers"]["layers"].split() == ["fdconsole", "gpu_worker", "scheduler"]
    assert set(contracts["acyclic_siblings"]["ancestors"].split()) == {"fdconsole", "gpu_worker", "scheduler"}
    forbidden = [section for section in sections if section["type"] == "forbidden"]
    assert {"django", "torch"} <= {m for c in forbidden if c["source_modules"].split() == ["scheduler"]
                                   for m in c["forbidden_modules"].split()}


def test_every_contract_is_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")  # installed beside this Python
    done = subprocess.run([str(lint_imports), "--no-cache", str(CONFIG)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
