"""targets/ in four sub-packages with arrows pointing down: the model contract (model), the
backends that run a model (backends), the control method (control), serving (serving); beside
them the shared utilities (errors, child_process, cpus). A module imports only its own layer,
layers below it and the utilities: never one above (lazy imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

TARGETS = Path(__file__).resolve().parent.parent / "targets"
ORDER = ["model", "backends", "control", "serving"]
UTILITIES = {"errors", "child_process", "cpus"}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("targets"):
            found.add(node.module)
            if node.module in ("targets", "targets.serving", "targets.control", "targets.backends", "targets.model"):
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("targets"))
    return found


def test_every_module_of_targets_sits_in_a_layer_or_is_a_utility():
    top = {p.stem for p in TARGETS.glob("*.py")} - {"__init__"}
    assert top == UTILITIES
    assert {p.name for p in TARGETS.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ORDER)


def test_arrows_point_down():
    wrong = []
    for layer in ORDER:
        allowed = set(ORDER[: ORDER.index(layer) + 1])
        for path in (TARGETS / layer).glob("*.py"):
            for name in imports_of(path):
                parts = name.split(".")
                if len(parts) >= 2 and parts[1] in ORDER and parts[1] not in allowed:
                    wrong.append(f"targets/{layer}/{path.name} imports {name}")
    for name in UTILITIES:
        for imported in imports_of(TARGETS / f"{name}.py"):
            parts = imported.split(".")
            if len(parts) >= 2 and parts[1] in ORDER:
                wrong.append(f"targets/{name}.py (a utility) imports {imported}")
    assert wrong == []


def test_the_sub_packages_import_nothing_themselves():
    """``import targets.serving.triton_bio`` must not drag the gateway (FastAPI) in with it."""
    for layer in ORDER:
        tree = ast.parse((TARGETS / layer / "__init__.py").read_text())
        assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], layer
