"""Modules that must sit in no import cycle (every import counts, lazy ones included): a
cycle means neither module can be read, tested or split without the other (issue 24)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"stepprobe": "stepprobe", "stepprobe.inference": "inference", "stepprobe.training": "training",
            "stepprobe.data_collection": "data_collection", "stepprobe.probes": "probes"}
ACYCLIC = ["stepprobe.options", "stepprobe.config", "stepprobe.data_collection.problems",
           "stepprobe.data_collection.sources", "stepprobe.data_collection.tasks",
           "stepprobe.data_collection.ood_tasks", "stepprobe.data_collection.ood2_tasks",
           "stepprobe.data_collection.prompts", "stepprobe.data_collection.record", "stepprobe.data_collection.extractor",
           "stepprobe.inference.worker", "stepprobe.inference.capture", "stepprobe.inference.tracker",
           "stepprobe.inference.batch_layout", "stepprobe.inference.hooks",
           "stepprobe.training.tune", "stepprobe.training.search_space", "stepprobe.training.study",
           "stepprobe.training.liveness", "stepprobe.lifetime"]


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            if pkg == "stepprobe" and parts and parts[0] in PACKAGES.values():
                continue  # the symlinked subpackages, listed under their own name
            mods[".".join([pkg, *parts])] = f
    return mods


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        base = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = base.split(".")
                head = parts[: len(parts) - node.level + 1] if node.level else []
                target = ".".join(head + ([node.module] if node.module else []))
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n for n in names if n in mods and n != name}
        graph[name] = deps
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "stepprobe.released" in graph["stepprobe.options"]  # imported inside a method


@pytest.mark.parametrize("module", ACYCLIC)
def test_module_is_in_no_import_cycle(module):
    graph = import_graph()
    assert module in graph, f"{module} does not exist"
    cycle = sorted(m for m in reachable(graph, module) if module in reachable(graph, m))
    assert module not in reachable(graph, module), f"{module} is in an import cycle with {cycle}"
