"""The README's promises: its python snippets run, its first screen fits and says how to
install and run, and every `file.py:name` it points at exists."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FIRST_SCREEN = 80  # what it is, install, run, one results table, the paper -> code map


def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def snippets():
    return re.findall(r"^```python\n(.*?)^```", readme(), re.S | re.M)


def first_screen():
    lines = readme().splitlines()
    n = next((k for k, line in enumerate(lines) if "<details" in line), len(lines))
    return lines[:n]


def test_readme_has_snippets():
    assert len(snippets()) >= 3


@pytest.mark.parametrize("k", range(len(snippets())))
def test_snippet_runs(k):
    """Run as written, from the repository root, as a reader who pastes it would."""
    code = snippets()[k]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the root is on sys.path: python -c puts the cwd first
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, f"README snippet {k} failed:\n{code}\n--- stderr ---\n{p.stderr[-3000:]}"


def test_first_screen_fits():
    lines = first_screen()
    assert len(lines) < len(readme().splitlines()), "no <details> section in README.md"
    assert len(lines) <= FIRST_SCREEN, f"{len(lines)} lines before the first <details>, at most {FIRST_SCREEN}"


def test_first_screen_says_how_to_run():
    text = "\n".join(first_screen())
    for command in ("pip install -r requirements.txt", "python -m pytest -q tests", "python run.py --data"):
        assert command in text, f"{command!r} is not on the README's first screen"


def top_level_names(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_code_references_resolve():
    refs = sorted(set(re.findall(r"`([A-Za-z_]\w*\.py):([A-Za-z_]\w*)`", readme())))
    assert len(refs) >= 8, f"only {len(refs)} `file.py:name` references in README.md"
    missing = []
    for file, name in refs:
        path = os.path.join(ROOT, file)
        if not os.path.isfile(path) or name not in top_level_names(path):
            missing.append(f"{file}:{name}")
    assert not missing, f"README.md points at names that are no top-level def or class: {missing}"
