"""The README's "Use it from Python" example runs as written: its python code block, verbatim, in a fresh process."""

import os
import re
import subprocess
import sys

from support import ROOT

HEADING = "## Use it from Python"


def readme_example():
    """The first ```python block under the README's "Use it from Python" heading (before the next heading)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert HEADING + "\n" in readme, f"README.md has no '{HEADING}' section"
    section = readme.split(HEADING + "\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one python block under '{HEADING}', found {len(blocks)}"
    return blocks[0]


def test_the_readme_example_runs_as_written(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(re.fullmatch(r"pgd_sat accuracy \d\.\d{3}, 95% CI \[\d\.\d{3}, \d\.\d{3}\] on 64 images", line)
               for line in lines), result.stdout
    assert lines[-1].startswith("[b'class_"), result.stdout
    assert os.listdir(tmp_path) == ["example.py"]  # everything it wrote went to its temporary directory
