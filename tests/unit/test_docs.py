"""The documentation ships with the project: no reference to files outside it, and every trainer is documented.

Fast: reads text files only (no imports of the trainers, no nnU-Net).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED_FOLDERS = ("nnssl", "nnssl_trainers", "dataset_conversion", "tests", "docs")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".json", ".toml", ".cfg", ".sh", ".yml", ".yaml", ".rst"}
# built from pieces so that this file does not contain the strings it forbids
FORBIDDEN = ("shared" + "/methods", "SPEC" + ".md", "../" + "shared")
METHOD_DOCS = ("mean_teacher", "cps", "guidednet", "sdcl", "dhc", "mgcc", "pseudolabel", "entropy_min")
TRAINER_CLASS = re.compile(r"^class (nnUNetTrainer\w+)", re.MULTILINE)


def _project_text_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in SCANNED_FOLDERS:
        files += [p for p in sorted((ROOT / folder).rglob("*"))
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_no_reference_to_files_outside_the_project():
    offenders = []
    for path in _project_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            for needle in FORBIDDEN:
                if needle in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {needle!r}")
    assert not offenders, "references to files that are not part of the project:\n" + "\n".join(offenders)


@pytest.mark.parametrize("name", METHOD_DOCS + ("README",))
def test_method_page_exists(name):
    page = ROOT / "docs" / "methods" / f"{name}.md"
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert page.read_text(encoding="utf-8").strip()


def test_index_links_every_method_page():
    index = (ROOT / "docs" / "methods" / "README.md").read_text(encoding="utf-8")
    missing = [name for name in METHOD_DOCS if f"({name}.md)" not in index]
    assert not missing, f"docs/methods/README.md does not link {missing}"


def test_every_trainer_is_documented():
    trainers = set()
    for path in sorted((ROOT / "nnssl_trainers").glob("*.py")):
        trainers.update(TRAINER_CLASS.findall(path.read_text(encoding="utf-8")))
    trainers.discard("nnUNetTrainerSSLBase")
    assert trainers, "no trainer classes found in nnssl_trainers/"
    docs = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs" / "methods").glob("*.md")))
    docs += "\n" + (ROOT / "README.md").read_text(encoding="utf-8")
    undocumented = [name for name in sorted(trainers) if not re.search(rf"\b{name}\b", docs)]
    assert not undocumented, f"trainers missing from docs/methods/*.md and README.md: {undocumented}"


def test_readme_add_a_method_example_is_the_shipped_trainer():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Add a method"):]
    start = section.index("```python") + len("```python")
    snippet = section[start:section.index("```", start)]
    shipped = (ROOT / "nnssl_trainers" / "entropy_min.py").read_text(encoding="utf-8")
    assert len(shipped.splitlines()) <= 80, "the worked example must stay short"
    # every code line of the README's snippet (the docstring is abridged there) is in the shipped file, in order
    code = [line for line in snippet.strip().splitlines() if line.strip() and '"""' not in line]
    position = 0
    for line in code:
        found = shipped.find(line, position)
        assert found >= 0, f"README line not in nnssl_trainers/entropy_min.py (in order): {line!r}"
        position = found + len(line)

