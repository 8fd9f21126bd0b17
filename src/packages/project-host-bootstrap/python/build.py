#!/usr/bin/env python3
"""Build the shipped bootstrap.py from the modules in cocalc_bootstrap/.

bootstrap.py is developed as a package of modules and shipped as one readable
file (the SQLite amalgamation is the model). This script concatenates the
modules in MODULES order: one header (the docstring below, the stdlib imports
of every module merged and sorted), then each module's code under a banner
naming it, with its own imports removed, then the `__main__` guard.

The output depends only on the module sources: no time, no paths, no
environment, so the same sources always give the same bytes (CI builds twice
and compares, and compares with the committed and the packed file).

Rules it enforces, so that the one-file form means the same as the modules:
- a module imports from the package only with `from .x import a, b`, and only
  from modules listed before it (imports go one way, no cycles);
- every import is at the top of its module, before any code;
- no top-level name is defined in two modules (one namespace once built).

Usage: build.py [--out PATH] [--check]
  --check  exit 1 (and say which) when the committed bootstrap.py differs from a fresh build.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "cocalc_bootstrap"
OUTPUT = HERE / "bootstrap.py"

# Dependency order: each module may import only from modules before it.
MODULES = (
    "errors",
    "log",
    "events",
    "commands",
    "slots",
    "config_rules",
    "config",
    "facts",
    "step",
    "fetch",
    "archive",
    "apt",
    "system",
    "layout",
    "debris",
    "images",
    "steps_host",
    "steps_install",
    "steps_system",
    "steps_platform",
    "engine",
    "reporting",
    "cli",
)

MAX_MODULE_LINES = 800
LINE_LENGTH = 120
BANNER = "# " + "=" * 76

HEADER = '''#!/usr/bin/env python3
"""bootstrap.py - turn a fresh VM into a CoCalc project host.

Reads one JSON config (see @cocalc/project-host-bootstrap's schema), validates
all of it before touching the machine, then runs the bootstrap steps as a
dependency graph, in parallel unless the config says `"parallel": false`.

Stdlib only; runs on the distribution's python3 (3.10 or newer). Importing
this file does nothing, so tests import it.

Built by python/build.py from the modules in python/cocalc_bootstrap/ (one
section per module below, in dependency order); edit those, not this file.
"""

from __future__ import annotations
'''

FOOTER = """

if __name__ == "__main__":
    sys.exit(main())
"""


class BuildError(Exception):
    pass


class Module:
    """One source module: its stdlib imports, package imports and code."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.tree = ast.parse(text, filename=f"{name}.py")
        self.doc = ast.get_docstring(self.tree) or ""
        self.plain_imports: set[str] = set()
        self.from_imports: dict[str, set[str]] = {}
        self.package_imports: dict[str, set[str]] = {}
        self.code = self._split()

    def where(self, node: ast.stmt) -> str:
        return f"cocalc_bootstrap/{self.name}.py:{node.lineno}"

    def _split(self) -> str:
        body = list(self.tree.body)
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:]
        last_import_line = 0
        seen_code = False
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                if seen_code:
                    raise BuildError(f"{self.where(node)}: import after code; move it to the top of the module")
                self._take_import(node)
                last_import_line = node.end_lineno or node.lineno
            else:
                seen_code = True
        for inner in ast.walk(self.tree):
            if isinstance(inner, ast.ImportFrom) and inner.level and inner not in self.tree.body:
                raise BuildError(f"{self.where(inner)}: package import inside a function; import at the top")
        lines = self.text.splitlines()
        return "\n".join(lines[last_import_line:]).strip("\n") + "\n"

    def _take_import(self, node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    raise BuildError(f"{self.where(node)}: `import {alias.name} as {alias.asname}` is not supported")
                self.plain_imports.add(alias.name)
            return
        if any(alias.asname for alias in node.names) or any(alias.name == "*" for alias in node.names):
            raise BuildError(f"{self.where(node)}: use plain `from x import a, b` (no `as`, no `*`)")
        names = {alias.name for alias in node.names}
        if node.level:
            if node.level != 1 or not node.module:
                raise BuildError(f"{self.where(node)}: import siblings as `from .module import name`")
            self.package_imports.setdefault(node.module, set()).update(names)
        elif node.module != "__future__":
            assert node.module is not None
            self.from_imports.setdefault(node.module, set()).update(names)

    def top_level_names(self) -> set[str]:
        names: set[str] = set()
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        return names


def name_key(name: str) -> tuple[int, str]:
    """isort's order-by-type, as ruff applies it: CONSTANTS, Classes, functions."""
    if name.isupper() and len(name) > 1:
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def from_import_line(module: str, names: set[str]) -> str:
    ordered = sorted(names, key=name_key)
    line = f"from {module} import {', '.join(ordered)}"
    if len(line) <= LINE_LENGTH:
        return line
    inner = "".join(f"    {name},\n" for name in ordered)
    return f"from {module} import (\n{inner})"


def load_modules(package: Path) -> list[Module]:
    on_disk = {p.stem for p in package.glob("*.py")} - {"__init__"}
    if on_disk != set(MODULES):
        raise BuildError(
            f"modules on disk {sorted(on_disk - set(MODULES))} are not in MODULES, "
            f"or MODULES names missing files {sorted(set(MODULES) - on_disk)}; update build.py"
        )
    return [Module(name, (package / f"{name}.py").read_text(encoding="utf-8")) for name in MODULES]


def check_modules(modules: list[Module]) -> None:
    defined_in: dict[str, str] = {}
    for index, module in enumerate(modules):
        earlier = set(MODULES[:index])
        for dep, names in module.package_imports.items():
            if dep not in earlier:
                raise BuildError(
                    f"cocalc_bootstrap/{module.name}.py imports {sorted(names)} from .{dep}, which is not "
                    f"before it in MODULES; imports must go one way (move the definitions down)"
                )
        lines = module.text.count("\n")
        if lines > MAX_MODULE_LINES:
            raise BuildError(f"cocalc_bootstrap/{module.name}.py has {lines} lines (max {MAX_MODULE_LINES}); split it")
        for name in module.top_level_names():
            if name in defined_in:
                raise BuildError(f"{name} is defined in both {defined_in[name]}.py and {module.name}.py")
            defined_in[name] = module.name


def build(package: Path = PACKAGE) -> str:
    modules = load_modules(package)
    check_modules(modules)
    plain: set[str] = set()
    froms: dict[str, set[str]] = {}
    for module in modules:
        plain.update(module.plain_imports)
        for source, names in module.from_imports.items():
            froms.setdefault(source, set()).update(names)
    imports = [f"import {name}" for name in sorted(plain)]
    imports += [from_import_line(source, froms[source]) for source in sorted(froms)]
    parts = [HEADER, "\n", "\n".join(imports), "\n"]
    for index, module in enumerate(modules):
        summary = module.doc.strip().splitlines()[0] if module.doc.strip() else ""
        title = f"# {module.name}: {summary}" if summary else f"# {module.name}"
        gap = "\n" if index == 0 else "\n\n"  # as ruff's isort wants after the import block
        parts.append(f"{gap}{BANNER}\n{title}\n{BANNER}\n\n")
        code = module.code
        if not code.startswith("#"):
            parts.append("\n")
        parts.append(code)
    parts.append(FOOTER)
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build bootstrap.py from cocalc_bootstrap/*.py.")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="where to write (default: python/bootstrap.py)")
    parser.add_argument("--check", action="store_true", help="compare the committed file with a fresh build")
    args = parser.parse_args(argv)
    try:
        text = build()
    except BuildError as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    if args.check:
        current = args.out.read_bytes() if args.out.exists() else b""
        if current != text.encode("utf-8"):
            print(
                f"build.py: {args.out} differs from a fresh build of cocalc_bootstrap/; "
                "run `python3 python/build.py` and commit the result",
                file=sys.stderr,
            )
            return 1
        return 0
    args.out.write_bytes(text.encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
