"""The house's rules, read from the source: which package may import which, no import circles
between files, and no query built outside db/. Each rule is also shown to catch a breach, on a
small tree made for the purpose."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "api", "worker", "convoy", "db", "models", "client")

# What each package may import of Convoy, besides itself (LAYOUT: cli on top; api and worker;
# convoy, the shared kernel; db, models and client at the bottom).
ALLOWED = {
    "cli": {"api", "worker", "convoy", "db", "models", "client"},
    "api": {"convoy", "db", "models"},
    "worker": {"convoy", "db", "models"},
    "convoy": {"db", "models"},
    "db": set(),
    "models": set(),
    "client": set(),
}
# Building a query is db/'s job: a route or a worker calls db/ functions.
QUERY = re.compile(r"(?<![\w.])(select|update|delete|insert)\("
                   r"|\bsession\.(query|scalars?|execute|get)\(")
NO_QUERIES = ("api", "worker", "cli")


def modules(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the Convoy modules it imports (`from a import b` counts as a.b when b is a
    module, else as a), at any depth in the file (lazy imports count too)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in mods else node.module)
        resolved = set()
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                resolved.add(target)
        graph[name] = resolved
    return graph


def upward(root: Path) -> list[str]:
    """Imports that break ALLOWED, as 'a.b -> c.d' lines."""
    bad = []
    for name, targets in sorted(imports(root).items()):
        package = name.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                bad.append(f"{name} -> {target}")
    return bad


def circles(root: Path) -> list[list[str]]:
    """Groups of files that import each other, directly or around a loop (Tarjan)."""
    graph = imports(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def queries_outside_db(root: Path) -> list[str]:
    hits = []
    for package in NO_QUERIES:
        for path in sorted((root / package).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if QUERY.search(code):
                    hits.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return hits


# -- the rules, on this tree ------------------------------------------------------------------

def test_no_package_imports_one_above_it() -> None:
    assert upward(ROOT) == []


def test_no_two_files_import_each_other() -> None:
    assert circles(ROOT) == []


def test_no_query_is_built_outside_db() -> None:
    assert queries_outside_db(ROOT) == []


# -- the rules catch what they are for --------------------------------------------------------

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_a_route_that_gains_a_select_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"api/routes.py": "def f(s):\n    return s.scalars(select(Job))\n",
                            "db/jobs.py": "def g(s):\n    return s.scalars(select(Job))\n"})
    assert queries_outside_db(root) == ["api/routes.py:2: return s.scalars(select(Job))"]


def test_models_importing_the_shared_package_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"models/capture.py": "from convoy.featuremaps import pool_window\n",
                            "convoy/featuremaps.py": "import math\n"})
    assert upward(root) == ["models.capture -> convoy.featuremaps"]


def test_db_importing_the_api_or_the_shared_package_is_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"db/session.py": "def f():\n    from convoy.settings import x\n",
                            "db/jobs.py": "import api.auth\n",
                            "convoy/settings.py": "", "api/auth.py": ""})
    assert upward(root) == ["db.jobs -> api.auth", "db.session -> convoy.settings"]


def test_two_files_importing_each_other_are_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"worker/runner.py": "from worker.feature_maps import run\n",
                            "worker/feature_maps.py": "def run():\n"
                                                      "    from worker import runner\n"})
    assert circles(root) == [["worker.feature_maps", "worker.runner"]]


def test_the_readme_layout_names_the_packages_and_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for package in PACKAGES:
        assert f"{package}/" in layout, f"README's layout leaves out {package}/"
    # every file it names (name.py) is in the package its line (or the entry above) is about
    current = None
    for line in layout.splitlines():
        if m := re.match(r"^(?:layer \d\s+)?\s*([a-z]+)/\s", line):
            current = m.group(1)
        for name in re.findall(r"\b([a-z_]+)\.py\b", line):
            if current in PACKAGES:
                assert (ROOT / current / f"{name}.py").exists(), f"{current}/{name}.py"
