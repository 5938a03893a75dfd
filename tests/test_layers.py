"""The layers import downward only (t2i_reward.rewarders <- .prompter <- .finetune <- .service <- the root
package and its CLI), no module imports itself through a cycle, and the registry is a leaf. Checked on the
source: every import statement, at module level or inside a function. Folders map to packages through
pyproject's `[tool.setuptools.package-dir]`, the same table the installer reads."""

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["t2i_reward.rewarders", "t2i_reward.prompter", "t2i_reward.finetune", "t2i_reward.service", "t2i_reward"]
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + "."))


def project_modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for p in base.rglob("*.py"):
            parts = list(p.relative_to(base).with_suffix("").parts)
            out[".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])] = p
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (a `from pkg import sub` that names a submodule counts as sub)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a non-module attribute: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def test_no_upward_import():
    upward = []
    for mod, deps in graph().items():
        upward += [f"{mod} -> {d}" for d in deps if layer_of(d) > layer_of(mod)]
    assert upward == []


def test_no_import_cycle():
    g = graph()
    # a package's __init__ re-exports its modules; a module of the package never imports its own __init__
    own_init = [f"{m} -> {d}" for m, deps in g.items() for d in deps if m.startswith(d + ".")]
    assert own_init == []
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_registry_is_a_leaf():
    assert graph()["t2i_reward.rewarders.registry"] <= {"t2i_reward.rewarders.errors"}


def test_the_checker_sees_imports(tmp_path):
    # the walker resolves relative and absolute imports to project modules
    g = graph()
    assert "t2i_reward.rewarders.registry" in g["t2i_reward.rewarders.experts.imagereward"]
    assert "t2i_reward.rewarders.factory" in g["t2i_reward.rewarders"]
    assert "t2i_reward.finetune.spec" in g["t2i_reward.service.routers.jobs"] and "t2i_reward.rewarders.client" in g["t2i_reward.finetune.rewards"]
