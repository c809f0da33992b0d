"""The stages import only from stages before them (README "Layout", docs/ARCHITECTURE.md), so
each can be used and tested without the later ones; sapsam_jax.job sits above them all."""

import ast
from pathlib import Path

from conftest import REPO_ROOT

ORDER = ("backend", "config", "kernels", "io", "preprocess", "data", "models", "train", "explain")
ORDER += ("evaluate", "job")
# backend and config are the foundation every stage may use (one source for CPU and GPU).
FOUNDATION = {"backend", "config", "kernels"}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "sapsam_jax" and len(parts) > 1 else None


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Absolute names of the sapsam_jax modules ``path`` imports (relative imports resolved)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            if module == "sapsam_jax":  # from sapsam_jax import train: the names are stages
                found += [(node.lineno, f"sapsam_jax.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, module))
    return found


def test_no_stage_imports_a_later_one():
    root = REPO_ROOT / "sapsam_jax"
    violations = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        package = package.removesuffix(".__init__")
        here = stage_of(module.removesuffix(".__init__") + ".x") or "sapsam_jax"
        if here not in ORDER:
            continue
        for line, name in imported_modules(path, package):
            there = stage_of(name or "")
            if there is None or there == here or there in FOUNDATION:
                continue
            if there not in ORDER or ORDER.index(there) > ORDER.index(here):
                violations.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {name}")
    assert not violations, "\n".join(violations)
