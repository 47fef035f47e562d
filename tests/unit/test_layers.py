"""The layers of the code: the library (``nnssl/``) never imports the trainer plugin (``nnssl_trainers/``), and the
plugin folder holds trainer modules only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_plugin():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p)
                                                  if m.split(".")[0] == "nnssl_trainers")
                 for p in (REPO / "nnssl").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_plugin_module_defines_trainers_and_imports_no_other_plugin_module():
    import importlib
    import inspect

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    for path in sorted((REPO / "nnssl_trainers").glob("*.py")):
        if path.name == "__init__.py":
            continue
        assert not any(m.split(".")[0] == "nnssl_trainers" for m in _imported_modules(path)), path.name
        module = importlib.import_module(f"nnssl_trainers.{path.stem}")
        defined = [obj for _, obj in inspect.getmembers(module, inspect.isclass) if obj.__module__ == module.__name__]
        assert defined and all(issubclass(obj, nnUNetTrainer) for obj in defined), (path.name, defined)


def test_test_modules_have_unique_basenames():
    """pytest imports test files by basename (no packages): two of one name stop the whole run at collection."""
    from collections import Counter
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in tests.rglob("test_*.py"))
    assert [n for n, c in names.items() if c > 1] == []


def test_subprocess_output_is_decoded_as_utf8_whatever_the_locale():
    """Our CLIs print UTF-8 (progress bars, dashes); ``text=True`` alone decodes with the locale's codec, which is
    ASCII on a machine with ``LANG=C`` and raised UnicodeDecodeError in CI. Every decoding call names its codec."""
    offenders = []
    for folder in ("nnssl", "nnssl_trainers", "tests", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    keywords = {k.arg for k in node.keywords}
                    if keywords & {"text", "universal_newlines"} and "encoding" not in keywords:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_hard_labels_use_class_argmax_not_torch_argmax():
    """``torch.argmax`` over the class dimension is 4-8x slower than ``max(dim).indices`` on a CPU (see
    ``nnssl.tensors.class_argmax``); every tensor argmax with a dimension in the library and the trainers goes through
    the helper (numpy's ``np.argmax`` and argmax of a flat tensor are not concerned)."""
    offenders = []
    for folder in ("nnssl", "nnssl_trainers"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "argmax"):
                    continue
                owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
                if owner in ("np", "numpy"):
                    continue
                dim_args = node.args[1:] if owner == "torch" else node.args  # torch.argmax(x, 1) / x.argmax(1)
                if dim_args or any(k.arg == "dim" for k in node.keywords):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
