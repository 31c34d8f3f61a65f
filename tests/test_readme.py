"""The README's quick start runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_a_quick_start():
    assert len(_python_blocks()) >= 1


def test_readme_quick_start_runs(capsys):
    namespace = {}
    exec(compile(_python_blocks()[0], str(README), "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    assert "exact" in out and "IWAE" in out
    # IWAE is a stochastic lower bound in expectation: far above the exact value means a bug.
    assert float(namespace["iwae"].mean()) <= float(namespace["exact"].mean()) + 1.0
