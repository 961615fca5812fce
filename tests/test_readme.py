"""The README's commands are the ones CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    commands = [line for b in blocks[:2] for line in b.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    install_demo, tests = commands
    assert "jaxflow demo" in install_demo
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert tests in ci


def test_the_python_section_runs_as_written(tmp_path, monkeypatch):
    """The README's Python blocks, executed in order as a user would paste them (toy model converted into a fresh
    cache)."""
    import matplotlib

    matplotlib.use("Agg")
    readme = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no Python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXFLOW_CACHE", str(tmp_path / "cache"))
    names = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), names)
    for picture in ("attention.png", "patches.png"):
        assert (tmp_path / picture).stat().st_size > 10_000, picture
    if "restored" in names:  # the patching block
        assert names["restored"].shape[0] == names["layers"]
