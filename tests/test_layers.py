"""Dependencies point down: every import in src/kvshelf against the layer map in docs/architecture.md.

The map is the fenced block under "## Layers": one row per line, top first, each naming its
packages (`shelf/`) and modules (`ports`) before two or more spaces and a description; indented
lines continue a description, and a line of dashes separates the engine-agnostic core below it
from the engines' side. A module may import from its own row and from the rows below; nothing
below the line may import an engine. Lazy imports inside functions count; imports under `if
TYPE_CHECKING:` name a type only and do not. Changing the structure means changing that page.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "src" / "kvshelf"
ENGINES = {"vllm", "transformers"}


def layer_map(architecture: str) -> tuple[list[set[str]], int]:
    """The rows of names, top first, and the index of the first row below the line."""
    block = re.search(r"^## Layers.*?^```\n(.*?)^```", architecture, re.MULTILINE | re.DOTALL)
    assert block, f"{ARCHITECTURE} has no fenced layer map under '## Layers'"
    rows: list[set[str]] = []
    line_at = None
    for line in block.group(1).splitlines():
        if re.fullmatch(r"-{3,}", line.strip()):
            line_at = len(rows)
        elif line.strip() and not line[0].isspace():
            names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            rows.append({name.rstrip("/") for name in re.split(r"[,\s]+", names) if name})
    assert line_at is not None, f"the layer map in {ARCHITECTURE} has no line of dashes"
    return rows, line_at


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether `name` (kvshelf.x.y) is a module or package of kvshelf."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return name.split(".")[0] == "kvshelf" and (path.with_suffix(".py").is_file() or path.is_dir())


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` imports, lazily or not, leaving out `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package
                package = module.split(".")[: len(module.split(".")) - node.level + is_package]
                found.add(".".join(package + ([node.module] if node.module else [])))
            else:  # `from kvshelf import children` imports the module kvshelf.children
                names = (f"{node.module}.{alias.name}" for alias in node.names)
                found.update(name if is_module(name) else node.module for name in names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def package_imports() -> dict[str, set[str]]:
    return {
        module_name(path): imports_of(path.read_text(), module_name(path), path.name == "__init__.py")
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def layer_name(module: str) -> str | None:
    """The map's name for a kvshelf module (`kvshelf.shelf.stack` -> `shelf`); None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(rows: list[set[str]], imports: dict[str, set[str]]) -> list[str]:
    row_of = {name: index for index, row in enumerate(rows) for name in row}
    found = []
    for module, imported in sorted(imports.items()):
        for target in sorted(name for name in imported if name.split(".")[0] == "kvshelf"):
            if layer_name(target) is None:
                found.append(f"{module} imports the package root {target}: import from the module that defines it")
                continue
            target_row, module_row = row_of.get(layer_name(target)), row_of.get(layer_name(module))
            if target_row is not None and module_row is not None and target_row < module_row:
                found.append(f"{module} imports {target}, a layer above it")
    return found


def test_every_module_is_on_the_layer_map():
    rows, _ = layer_map(ARCHITECTURE.read_text())
    on_map = set().union(*rows)
    in_package = {layer_name(module) for module in package_imports()} - {None}
    assert in_package - on_map == set(), f"add these to the layer map in {ARCHITECTURE}"
    assert on_map - in_package == set(), f"the layer map in {ARCHITECTURE} names modules that do not exist"


def test_imports_point_down():
    rows, _ = layer_map(ARCHITECTURE.read_text())
    assert upward_imports(rows, package_imports()) == []


def test_nothing_below_the_line_imports_an_engine():
    rows, line_at = layer_map(ARCHITECTURE.read_text())
    core = set().union(*rows[line_at:])
    engine_imports = [
        f"{module} imports {name}"
        for module, imported in sorted(package_imports().items())
        if layer_name(module) in core
        for name in sorted(imported)
        if name.split(".")[0] in ENGINES
    ]
    assert engine_imports == []


def test_the_check_sees_lazy_imports_and_relative_ones_but_not_type_only_ones():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from kvshelf.config import SecurityConfig\n"
        "def load():\n    from kvshelf.integrations.hf import cache_to_canonical\n"
        "from .stack import TierStack\n"
        "from kvshelf import children, Shelf\n"
    )
    imported = imports_of(source, "kvshelf.shelf.cost")
    assert imported == {"typing", "kvshelf.integrations.hf", "kvshelf.shelf.stack", "kvshelf.children", "kvshelf"}
    rows = [{"integrations"}, {"shelf"}, {"config"}]
    assert upward_imports(rows, {"kvshelf.shelf.cost": imported}) == [
        "kvshelf.shelf.cost imports the package root kvshelf: import from the module that defines it",
        "kvshelf.shelf.cost imports kvshelf.integrations.hf, a layer above it",
    ]
