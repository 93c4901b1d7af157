"""DESIGN.md lists, in order, the file and function a request passes through in each mode: every one
it names exists, so the list cannot quietly go stale as the code moves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`((?:[\w.]+/)*[\w.]+\.(?:py|lua)):\s+([\w.]+)`")


def defines(path: Path, name: str) -> bool:
    text = path.read_text()
    if path.suffix == ".lua":
        return re.search(rf"^local function {re.escape(name)}\(", text, re.M) is not None
    *owner, attribute = name.split(".")
    if owner and not re.search(rf"^class {re.escape(owner[0])}\b", text, re.M):
        return False
    return re.search(rf"^\s*(async )?def {re.escape(attribute)}\(|^class {re.escape(attribute)}\b", text,
                     re.M) is not None


def test_every_file_and_function_on_the_path_exists():
    text = (ROOT / "DESIGN.md").read_text()
    path_section = text[text.index("## A request's path"):]
    references = REFERENCE.findall(text)
    assert len(REFERENCE.findall(path_section)) >= 25
    for file, name in references:
        path = ROOT / ("scheduler/" + file if file.startswith("lua/") else file)
        assert path.is_file(), file
        assert defines(path, name), f"{file} has no {name}"
