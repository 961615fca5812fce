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
