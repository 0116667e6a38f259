"""The layers and the code's shape, enforced rather than described: the import contracts in
pyproject.toml (lint-imports), ruff, and the few rules of STYLE.md that a machine can check."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_FUNCTION_LINES = 60


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    exe = BIN / tool if (BIN / tool).exists() else tool
    return subprocess.run([str(exe), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_import_contracts_hold():
    """Gate > tune > train > estimate > blocks; no block imports a verb; no cycle among siblings."""
    out = _run("lint-imports")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_ruff_is_clean():
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def _functions():
    for path in sorted((ROOT / "runner").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(ROOT), node


def test_the_verbs_are_packages():
    for verb in ("train", "tune", "estimate"):
        assert (ROOT / "runner" / verb / "__init__.py").is_file(), verb


def test_only_tracking_touches_the_mlflow_client():
    offenders = [f"{p}:{n.lineno}" for p in (ROOT / "runner").rglob("*.py") if p.name != "tracking.py"
                 for n in ast.walk(ast.parse(p.read_text()))
                 if isinstance(n, ast.Attribute) and n.attr == "client"]
    assert offenders == [], offenders


def test_summarise_takes_few_parameters():
    from runner.tune.report import summarise

    assert summarise.__code__.co_argcount <= 4


def test_long_functions_say_why():
    """A function over 60 lines says in its docstring why it is long (a driver that reads top to bottom)."""
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions()
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
            and "long on purpose" not in (ast.get_docstring(node) or "").lower()]
    assert long == [], long
