"""The package layout: stages import only upstream stages, so the pipeline reads in one direction.

Every `import` in gpurec (module level or inside a function) is checked against the data-flow
order of the stages; `kernels/` is a leaf library that never imports gpurec.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Data-flow order: a stage may import itself and the stages before it.
STAGES = ("data", "preprocess", "features", "embedding", "model", "train", "stream", "sync", "serve", "client", "privacy")
# Shared by every stage (imported from anywhere, import no stage themselves).
BASE = ("errors", "checks", "workspace")
# Top-level drivers that may import any stage and are imported by none.
DRIVERS = ("cli", "experiments", "demo")


def _imports(path: Path) -> set[str]:
    """Every module name imported by a file (absolute imports; the project uses no relative ones)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "gpurec" and len(parts) > 1 else None


def test_stages_import_only_upstream():
    violations = []
    for path in sorted((ROOT / "gpurec").rglob("*.py")):
        relative = path.relative_to(ROOT / "gpurec")
        own = relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 else relative.stem
        if own in DRIVERS or own == "__init__":
            continue
        for module in _imports(path):
            target = _package(module)
            if target is None or target == own or target in BASE or target == "__version__":
                continue
            if target in DRIVERS:
                violations.append(f"{relative}: imports the driver {module}")
            elif own in BASE:
                violations.append(f"{relative}: a base module imports {module}")
            elif target not in STAGES or own not in STAGES:
                violations.append(f"{relative}: {module} (unknown stage: add it to STAGES in data-flow order)")
            elif STAGES.index(target) > STAGES.index(own):
                violations.append(f"{relative}: {own} imports downstream {module}")
    assert not violations, "\n".join(violations)


def test_kernels_are_a_leaf_package():
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for path in sorted((ROOT / "kernels").rglob("*.py"))
        for module in _imports(path)
        if module.split(".")[0] == "gpurec"
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_a_downstream_import(tmp_path):
    """The checker itself: a downstream import in a stage is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from gpurec.serve.contract import PAD_ID\n    import gpurec.model.dlrm\n")
    imported = {_package(m) for m in _imports(sample)}
    assert {"serve", "model"} <= imported
    assert STAGES.index("serve") > STAGES.index("embedding")


ID_MAP_CLASSES = {"IdLookup", "ModuloRemap", "CollisionlessIds", "HashedIds"}


def test_only_the_embedding_stage_knows_the_id_map_kinds():
    """Training, evaluation, export and serving talk to id maps through `gpurec.embedding.idmap`
    (`id_map_for`, `serving_lookup`), never to an implementation: no branch on the kind."""
    offenders = []
    for path in sorted((ROOT / "gpurec").rglob("*.py")):
        if path.relative_to(ROOT / "gpurec").parts[0] == "embedding":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in ID_MAP_CLASSES:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
            if isinstance(node, ast.ImportFrom) and any(a.name in ID_MAP_CLASSES for a in node.names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports an id-map class")
    assert not offenders, "\n".join(offenders)
