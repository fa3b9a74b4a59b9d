"""The layering of docs/architecture.md, enforced: a module imports only from its own wing or a lower layer.

Layers, lowest first: wire < base < iceberg < reads < {changes, training} < online < transport < entry.
`flight_client` imports only the wire protocol (`flight_server.wire`, and the package's version); of the
server, only the entry modules (the command line, the demo loader) use the client.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "layers"

# Each layer is a list of wings (sub-packages of flight_server). A wing may import its own modules and any
# wing of a lower layer, never a wing of its own layer or a higher one. The package root (its version) is
# below everything; the modules directly in flight_server/ (the command line, the demo data) are the entry.
LAYERS: list[tuple[str, ...]] = [
    ("wire",),
    ("base",),
    ("iceberg",),
    ("reads",),
    ("changes", "training"),
    ("online",),
    ("transport",),
    ("entry",),
]
RANK = {wing: rank for rank, wings in enumerate(LAYERS) for wing in wings}
CLIENT_MAY_IMPORT = ("flight_server", "flight_server.wire")


def wing(module: str) -> str | None:
    """The wing of a `flight_server` module: its sub-package, "entry" for the top-level modules, or None for
    the package root."""
    parts = module.split(".")
    if parts[0] != "flight_server":
        return None
    if len(parts) == 1:
        return None
    return parts[1] if parts[1] in RANK else "entry"


def project_imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    """Every `flight_server` or `flight_client` module `path` imports, anywhere in it (function bodies too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return [(line, name) for line, name in found if name.split(".")[0] in ("flight_server", "flight_client")]


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(package: pathlib.Path, root: pathlib.Path) -> list[str]:
    """The imports in `package` (a folder under `root`) that break the layering."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, root)
        for line, target in project_imports(path, module):
            where = f"{path.relative_to(root)}:{line}: {module} imports {target}"
            if module.startswith("flight_client"):
                if not target.startswith("flight_client") and not (
                    target in CLIENT_MAY_IMPORT or target.startswith("flight_server.wire.")
                ):
                    found.append(f"{where}: the client may import only the wire protocol")
                continue
            if target.startswith("flight_client"):
                if wing(module) != "entry":  # the command line's `health` and `--demo` are the server's clients
                    found.append(f"{where}: only the entry modules use the client")
                continue
            mine, theirs = wing(module), wing(target)
            if theirs is None or mine == theirs:
                continue
            if mine is None or RANK[theirs] >= RANK[mine]:
                found.append(f"{where}: {mine} may import only lower layers, and {theirs} is not below it")
    return found


def test_every_wing_has_a_layer() -> None:
    wings = {p.name for p in (ROOT / "flight_server").iterdir() if (p / "__init__.py").exists()}
    assert wings == set(RANK) - {"entry"}


def test_server_and_client_keep_the_layering() -> None:
    assert violations(ROOT / "flight_server", ROOT) + violations(ROOT / "flight_client", ROOT) == []


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("flight_server/reads/climbs.py", "reads may import only lower layers, and training is not below it"),
        ("flight_server/changes/sideways.py", "changes may import only lower layers, and training is not below it"),
        ("flight_server/wire/relative.py", "wire may import only lower layers, and base is not below it"),
        ("flight_client/reaches.py", "the client may import only the wire protocol"),
    ],
)
def test_a_wrong_import_is_caught(fixture: str, expected: str) -> None:
    """The check itself: fixture modules that import against the layering (never imported, only parsed)."""
    found = violations((FIXTURES / fixture).parent, FIXTURES)
    assert any(expected in v and fixture in v for v in found), found


def test_the_fixtures_are_the_only_violations_there() -> None:
    found = violations(FIXTURES / "flight_server", FIXTURES) + violations(FIXTURES / "flight_client", FIXTURES)
    assert len(found) == 4, found
