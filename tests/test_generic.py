"""Generic first (the brief): nothing the agent, its sources, its config or the hub runs knows a dataset's
name. Checked on the code itself — every identifier and string that is not a docstring — of the agent's
modules, devices/ and the hub; comments and docstrings may cite where a number was measured."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATASETS = re.compile(r"skab|ipol|\bnab\b|fall_screening|fall-screening|seed_tug|tug_seed|tug_gait_23", re.I)
# The programs that run on the device or the hub. The training side (exporters/, edgekit/datasets.py,
# edgekit/recipes/, edgekit/demo.py, edgekit/cli.py's eval and demo commands) is where datasets are recipes.
AGENT_AND_HUB = [
    *(ROOT / "edgekit" / f"{m}.py" for m in (
        "agent", "source", "config", "window", "pipeline", "runtime", "gate", "plausible", "features", "gait",
        "outbox", "transport", "mqtt", "topics", "values", "manifest", "simulate", "broker", "bench", "paths",
        "inspection", "errors", "trial_features")),
    *sorted((ROOT / "edgekit" / "contract").glob("*.py")),
    *sorted((ROOT / "edgekit" / "hub").glob("*.py")),
    *sorted((ROOT / "devices").glob("*.py")),
]


def code_words(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every name, attribute and string constant that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            out.append((node.lineno, node.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
    return out


@pytest.mark.parametrize("path", AGENT_AND_HUB, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_agent_and_hub_code_names_no_dataset(path: Path) -> None:
    hits = [f"{path.relative_to(ROOT)}:{line}: {text[:80]!r}" for line, text in code_words(path)
            if DATASETS.search(text)]
    assert not hits, "\n".join(hits)


def test_the_check_sees_code_and_skips_docstrings(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text('"""Measured on SKAB."""\n# ipol\nFMT = "skab"\ndef f():\n    """ipol"""\n    return load_ipol()\n')
    assert [t for _, t in code_words(sample) if DATASETS.search(t)] == ["skab", "load_ipol"]
