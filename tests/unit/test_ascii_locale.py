"""nnssl under an ASCII locale (``LANG=C`` without Python's UTF-8 mode), where CI once failed on a read_text()."""
import os
import subprocess
import sys
from pathlib import Path

ASCII_ENV = {**os.environ, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LC_ALL": "C", "LANG": "C"}


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=ASCII_ENV, capture_output=True, timeout=60)


def test_the_environment_really_is_ascii():
    assert _run("import locale; print(locale.getpreferredencoding())").stdout.strip() == b"ANSI_X3.4-1968"


def test_a_console_script_prints_non_ascii_as_escapes_instead_of_failing():
    code = ("from nnssl.errors import report_user_errors\n"
            "report_user_errors('prog')(lambda: print('1.2\\u00d7 \\u2013 done'))()\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode("ascii").strip() == "1.2\\xd7 \\u2013 done"


def test_written_tables_with_non_ascii_read_back_under_an_ascii_locale(tmp_path: Path):
    path = tmp_path / "t.md"
    code = (f"from pathlib import Path\nfrom nnssl.io import atomic_write_text\n"
            f"atomic_write_text({str(path)!r}, '1.2\\u00d7')\n"
            f"assert Path({str(path)!r}).read_text(encoding='utf-8') == '1.2\\u00d7'\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert path.read_bytes() == "1.2×".encode("utf-8")
