"""Imports point one way: util <- ir <- frontends <- modeling <- passes <- drivers / top level, and the export code
(``secateurs.backends``: checkpoints, ONNX, TensorRT, latency) imports neither passes nor drivers.

Every import in the package's source counts, including the ones inside functions (a lazy import is still a
dependency). A new top-level module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import secateurs

UTIL = {"secateurs.errors", "secateurs.progress", "secateurs.distributed"}
TOP = {"secateurs", "secateurs.__main__", "secateurs.api", "secateurs.bench", "secateurs.cli", "secateurs.cli_parser",
       "secateurs.convert",
       "secateurs.data", "secateurs.demo", "secateurs.onnx_prune", "secateurs.recipe", "secateurs.report",
       "secateurs.spec", "secateurs.stream", "secateurs.stream_reload"}
PACKAGES = ("ir", "frontends", "modeling", "passes", "backends")
ALLOWED = {
    "util": {"util"},
    "ir": {"util", "ir"},
    "frontends": {"util", "ir", "frontends"},
    "modeling": {"util", "ir", "modeling"},
    "passes": {"util", "ir", "frontends", "modeling", "passes"},
    "backends": {"util", "ir", "frontends", "modeling", "backends"},
}
# Known edges against the rule, each with its reason; the list only shrinks.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def layer(module: str) -> str:
    """The layer of ``module``; an unknown top-level module is an error (give it a layer above)."""
    if module in UTIL:
        return "util"
    if module in TOP or module.startswith("secateurs.streaming"):  # the streamed driver's parts
        return "top"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in PACKAGES:
        return parts[1]
    raise AssertionError(f"module '{module}' has no layer: add it to UTIL, TOP or a package in tests/test_layers.py")


def imports(source: str, module: str) -> set[str]:
    """The ``secateurs`` modules ``source`` imports (relative imports resolved against ``module``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "secateurs")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "secateurs":
                out.add(base)
    return out


def violations(sources: dict[str, str]) -> list[str]:
    """Every import in ``sources`` (module name -> source) that points against the layers."""
    found = []
    for module, source in sorted(sources.items()):
        mine = layer(module)
        if mine == "top":
            continue
        for target in sorted(imports(source, module)):
            theirs = layer(target)
            if theirs not in ALLOWED[mine] and (module, target) not in EXCEPTIONS:
                found.append(f"{module} ({mine}) imports {target} ({theirs})")
    return found


def package_sources() -> dict[str, str]:
    root = Path(secateurs.__file__).parent
    sources = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text(encoding="utf-8")
    return sources


def test_imports_point_one_way():
    sources = package_sources()
    assert {"secateurs.modeling.rewrite", "secateurs.backends.checkpoint", "secateurs.passes.channels"} <= set(sources)
    assert violations(sources) == []


def private_imports(sources: dict[str, str]) -> list[str]:
    """Underscore names a module outside ``secateurs.passes`` imports from a pass module."""
    found = []
    for module, source in sorted(sources.items()):
        if layer(module) == "passes":
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("secateurs.passes"):
                found += [f"{module} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_drivers_and_exporters_use_no_private_helper_of_a_pass():
    assert private_imports(package_sources()) == []
    assert private_imports({"secateurs.stream": "from secateurs.passes.channels import _x, y\n"}) == [
        "secateurs.stream imports secateurs.passes.channels._x"]


def test_the_exceptions_are_still_needed():
    sources = package_sources()
    for module, target in EXCEPTIONS:
        assert target in imports(sources[module], module), f"{module} no longer imports {target}: drop the exception"


def test_the_check_sees_lazy_relative_and_package_imports():
    sources = {
        "secateurs.backends.x": "def f():\n    from secateurs.passes.depth import RemoveBlocks\n",
        "secateurs.ir.y": "from ..passes import base\n",
        "secateurs.modeling.z": "import secateurs\n",
        "secateurs.passes.w": "from secateurs.modeling.rewrite import Snapshot\nfrom secateurs.api import prune\n",
        "secateurs.backends.ok": "from secateurs.modeling.structure import find_moe_blocks\nimport torch\n",
    }
    assert violations(sources) == [
        "secateurs.backends.x (backends) imports secateurs.passes.depth (passes)",
        "secateurs.ir.y (ir) imports secateurs.passes (passes)",
        "secateurs.modeling.z (modeling) imports secateurs (top)",
        "secateurs.passes.w (passes) imports secateurs.api (top)",
    ]


# The dialect-free core: the op families' channel algebra, written once for ATen and ONNX, imports no framework.
CORE = {"secateurs.ir.families": {"secateurs.errors", "secateurs.ir.shape_families"},
        "secateurs.ir.shape_families": {"secateurs.errors", "secateurs.ir.families"},
        "secateurs.ir.cost": set()}


def runtime_imports(source: str) -> set[str]:
    """Top-level names of every module ``source`` imports at run time (``if TYPE_CHECKING:`` blocks skipped)."""
    tree = ast.parse(source)
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for child in node.body for n in ast.walk(child)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            out.add(node.module or "")
    return out - {"__future__", "collections.abc", "typing", "dataclasses", "math"}


def test_the_core_imports_no_framework():
    sources = package_sources()
    for module, allowed in CORE.items():
        assert runtime_imports(sources[module]) <= allowed, module
    assert runtime_imports("import torch\nif TYPE_CHECKING:\n    import onnx\nfrom typing import Any\n") == {"torch"}
