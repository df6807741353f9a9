"""The README's Python API example runs as printed (on the tiny preset's sizes, so it takes seconds)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_api_example_runs(capsys):
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # Shrink the digits preset's work to tiny's; every call stays the README's own.
    small = {'load_config("digits")': 'load_config("tiny")', "image_size=16": "image_size=8",
             "samples_per_class=2000": "samples_per_class=40"}
    for old, new in small.items():
        assert old in code, old
        code = code.replace(old, new)
    exec(compile(code, str(README), "exec"), {})
    assert 0.0 <= float(capsys.readouterr().out.strip().splitlines()[-1]) <= 1.0
