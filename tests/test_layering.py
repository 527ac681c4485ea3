"""The dependency direction holds: configuration -> token engine and stores -> request
pipeline -> server and command line. Core modules never import the web layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"

# Lower number = lower layer; a module may import only from its own layer or below.
LAYERS: dict[str, int] = {
    "errors": 0,
    "models": 0,
    "config": 1,
    "logs": 2,
    "metrics": 2,
    "tasks": 2,
    "deadlines": 2,
    "breaker": 2,
    "tlsconfig": 2,
    "clientauth": 2,
    "store": 3,
    "store_memory": 3,
    "store_sqlite": 3,
    "store_redis": 3,
    "stores": 3,
    "store_metrics": 3,
    "transport": 3,
    "oauth": 3,
    "tokens": 4,
    "chains": 4,
    "routing": 5,
    "headers": 5,
    "pipeline": 5,
    "server": 6,
    "admin": 6,
    "tunnel": 6,
    "runtime": 7,
    "workers": 7,
    "demo_http": 8,
    "demo_idp": 8,
    "demo_echo": 8,
    "demo": 8,
    "demo_run": 8,
    "cli": 9,
    "__main__": 9,
    "__init__": 0,
}
WEB_ALLOWED = {
    "server",
    "admin",
    "tunnel",
    "runtime",
    "demo",
    "demo_run",
    "demo_http",
    "demo_idp",
    "demo_echo",
}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under `if TYPE_CHECKING:` (annotations only, no runtime edge)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for inner in node.body:
                lines.add(inner.lineno)
    return lines


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


MODULES = sorted(p for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_layer() -> None:
    missing = [p.stem for p in MODULES if p.stem not in LAYERS]
    assert missing == [], f"add these modules to LAYERS: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_imports_point_down(path: Path) -> None:
    layer = LAYERS[path.stem]
    for name in imports_of(path):
        if name.startswith("proxy."):
            target = name.split(".")[1]
            if target in LAYERS:
                assert LAYERS[target] <= layer, f"{path.stem} (layer {layer}) imports {target}"
        if name in ("aiohttp.web", "aiohttp.web_request", "aiohttp.web_response"):
            assert path.stem in WEB_ALLOWED, f"{path.stem} imports the web layer ({name})"


def test_every_module_has_a_test_file() -> None:
    """Tests mirror modules (mitmproxy's filename matching), by name or by a named stand-in."""
    tests = {p.stem.removeprefix("test_") for p in Path(__file__).parent.glob("test_*.py")}
    covered_elsewhere = {
        "__init__": "package marker",
        "__main__": "test_config runs python -m proxy",
        "errors": "test_pipeline (every code)",
        "models": "test_chains",
        "store_memory": "test_stores",
        "store_sqlite": "test_stores",
        "store_redis": "test_stores",
        "stores": "test_stores",
        "store": "test_stores",
        "chains": "test_chains",
        "breaker": "test_resilience",
        "headers": "test_pipeline",
        "routing": "test_pipeline",
        "runtime": "test_lifecycle",
        "cli": "test_config, test_cli_commands",
        "demo_run": "test_cli_commands",
        "demo_http": "test_demo",
        "demo_idp": "test_demo",
        "demo_echo": "test_demo",
        "transport": "test_mtls",
        "server": "test_pipeline, test_forward",
        "workers": "test_workers",
        "tunnel": "test_forward",
        "store_metrics": "test_metrics",
    }
    missing = [p.stem for p in MODULES if p.stem not in tests and p.stem not in covered_elsewhere]
    assert missing == [], f"modules without tests: {missing}"
