"""The dependency contract (docs: design.md, "Dependency direction is the architecture"), read from the source.

    common  <-  client, server, audit, tools  <-  sim

- ``common`` imports no role of ours;
- ``client``, ``server``, ``audit`` and ``tools`` import nothing of ours but ``common`` (so a client never
  imports the server, nor the server a client);
- nothing imports ``sim`` (only ``sim`` itself, and the tests);
- every ``FEDTUNE_*`` environment variable is read in ``common/runtime.py`` only;
- a task is chosen by its ``Task`` object, never by comparing its name outside ``common/tasks/``.

Every module is parsed (``ast``), so imports inside functions and under ``if TYPE_CHECKING:`` count too,
as do relative imports and ``importlib.import_module("fedtune....")``. A failure names file, line and
the offending source. The roles are the ``package-dir`` entries of pyproject.toml: a new top-level
package fails ``test_every_role_has_a_rule`` until it gets one here.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"]  # {"fedtune.common": "common", ...}
ROLES = {name.removeprefix("fedtune."): ROOT / folder for name, folder in PACKAGE_DIRS.items()}
# The roles of ours each role may import besides itself (sim is left out: test_nothing_imports_sim).
MAY_IMPORT = {
    "common": frozenset(),
    "client": frozenset({"common"}),
    "server": frozenset({"common"}),
    "audit": frozenset({"common"}),
    "tools": frozenset({"common"}),
    "sim": frozenset({"common", "client", "server", "audit", "tools"}),
}
OURS = ("fedtune", "tests")  # top-level import names of this repository
RUNTIME = ROLES["common"] / "runtime.py"  # the one reader of FEDTUNE_* variables
TASKS_DIR = ROLES["common"] / "tasks"
TASK_NAMES = frozenset(p.name for p in TASKS_DIR.iterdir() if (p / "__init__.py").is_file())  # classify, ner, sft


@dataclass(frozen=True)
class Module:
    role: str
    path: Path
    name: str  # dotted import name: fedtune.client.round
    tree: ast.Module
    source: str

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    def where(self, node: ast.AST) -> str:
        """``path:line: `source``` for a failure message."""
        text = " ".join((ast.get_source_segment(self.source, node) or ast.unparse(node)).split())
        return f"{self.path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}: `{text[:160]}`"


def parse(source: str, name: str, path: Path, role: str) -> Module:
    return Module(role, path, name, ast.parse(source, filename=str(path)), source)


def modules(role: str) -> list[Module]:
    folder = ROLES[role]
    found = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        dotted = ".".join(("fedtune", role, *parts[:-1], *([] if parts[-1] == "__init__" else [parts[-1]])))
        found.append(parse(path.read_text(), dotted, path, role))
    return found


def _absolute(module: Module, level: int, target: str | None) -> str:
    """The absolute name a relative import (``from ..x import y``) refers to."""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree``, in source order (so that failures list lines in order)."""
    return sorted(ast.walk(tree), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))


def imports(module: Module) -> Iterator[tuple[ast.AST, str]]:
    """(node, absolute module name) for every import of ``module``, wherever it stands in the file."""
    for node in _nodes(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, node.level, node.module) if node.level else (node.module or "")
            if target in OURS or (node.level and not node.module):  # from fedtune import server / from . import x
                for alias in node.names:
                    yield node, f"{target}.{alias.name}"
            else:
                yield node, target
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            yield node, node.args[0].value


def role_of(target: str) -> str | None:
    """The role of ours an import names ("server" for fedtune.server.app), "tests", or None if not ours."""
    parts = target.split(".")
    if parts[0] == "tests":
        return "tests"
    if parts[0] != "fedtune":
        return None
    return parts[1] if len(parts) > 1 else "fedtune"  # bare `import fedtune`: no role, so never allowed


def direction_problems(module: Module) -> list[str]:
    """Imports of ``module`` against the dependency direction (imports of sim are test_nothing_imports_sim's)."""
    allowed = MAY_IMPORT[module.role] | {module.role}
    found = []
    for node, target in imports(module):
        role = role_of(target)
        if role is not None and role != "sim" and role not in allowed:
            may = ", ".join(f"fedtune.{r}" for r in sorted(allowed))
            found.append(f"{module.where(node)} imports {target}: {module.role} may import only {may}")
    return found


def sim_problems(module: Module) -> list[str]:
    if module.role == "sim":
        return []
    return [f"{module.where(node)} imports {target}: nothing imports sim (only sim itself and the tests)"
            for node, target in imports(module) if role_of(target) == "sim"]


# -- FEDTUNE_* variables ----------------------------------------------------------------------------------------------


def _runtime_variables() -> frozenset[str]:
    """Names of the ``Variable(...)`` constants in common/runtime.py (``DEVICE``, ...)."""
    tree = ast.parse(RUNTIME.read_text())
    return frozenset(t.id for node in tree.body if isinstance(node, ast.Assign)
                     and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "Variable"
                     for t in node.targets if isinstance(t, ast.Name))


RUNTIME_VARIABLES = _runtime_variables()


def _names_fedtune_variable(key: ast.AST) -> bool:
    """``"FEDTUNE_X"``, ``f"FEDTUNE_{...}"``, ``DEVICE.name`` or ``runtime.DEVICE.name``."""
    if isinstance(key, ast.Constant):
        return isinstance(key.value, str) and key.value.startswith("FEDTUNE_")
    if isinstance(key, ast.JoinedStr):
        return bool(key.values) and _names_fedtune_variable(key.values[0])
    if isinstance(key, ast.Attribute) and key.attr == "name":
        var = key.value
        return ((isinstance(var, ast.Name) and var.id in RUNTIME_VARIABLES)
                or (isinstance(var, ast.Attribute) and var.attr in RUNTIME_VARIABLES))
    return False


def _is_environ(node: ast.AST) -> bool:
    return ((isinstance(node, ast.Attribute) and node.attr == "environ")
            or (isinstance(node, ast.Name) and node.id == "environ"))


def env_reads(module: Module) -> list[str]:
    """Reads of a FEDTUNE_ variable: os.environ[...], os.environ.get/pop/setdefault(...), os.getenv(...), in."""
    found = []
    for node in _nodes(module.tree):
        key: ast.AST | None = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute):
            if ((node.func.attr in ("get", "pop", "setdefault") and _is_environ(node.func.value))
                    or node.func.attr == "getenv"):
                key = node.args[0]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Name) and node.func.id == "getenv":
            key = node.args[0]
        elif (isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.In | ast.NotIn)
              and _is_environ(node.comparators[0])):
            key = node.left
        if key is not None and _names_fedtune_variable(key):
            found.append(f"{module.where(node)}: FEDTUNE_* variables are read in common/runtime.py only "
                         "(declare it there and call its reader)")
    return found


# -- task names -------------------------------------------------------------------------------------------------------


def _task_constant(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in TASK_NAMES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_task_constant(e) for e in node.elts)
    return False


def task_comparisons(module: Module) -> list[str]:
    """``task == "classify"``, ``name in ("ner", "sft")``, ``case "sft":`` and the like."""
    found = [node for node in _nodes(module.tree)
             if (isinstance(node, ast.Compare) and any(_task_constant(n) for n in (node.left, *node.comparators)))
             or (isinstance(node, ast.MatchValue) and _task_constant(node.value))]
    return [f"{module.where(n)}: a task name is compared outside common/tasks/; ask the Task object instead"
            for n in found]


def _outside_tasks(module: Module) -> bool:
    return not module.path.is_relative_to(TASKS_DIR)


def _report(problems: list[str]) -> str:
    return f"{len(problems)} violation(s) of the dependency contract:\n" + "\n".join(problems)


ALL = [m for role in ROLES for m in modules(role)]


# -- the contract -----------------------------------------------------------------------------------------------------


def test_every_role_has_a_rule_and_every_role_has_modules() -> None:
    assert set(ROLES) == set(MAY_IMPORT), f"pyproject.toml package-dir roles {sorted(ROLES)} need a rule here"
    for role in ROLES:
        mods = [m for m in ALL if m.role == role]
        assert mods, f"no module found for {role} in {ROLES[role]}"
    # the scan sees the imports of ours that are really there (it would pass vacuously otherwise)
    assert sum(1 for m in ALL for _, t in imports(m) if role_of(t) == "common") > 100
    assert {"classify", "ner", "sft"} <= TASK_NAMES and {"DEVICE", "SIM_NODES"} <= RUNTIME_VARIABLES


@pytest.mark.parametrize("role", sorted(MAY_IMPORT))
def test_imports_follow_the_dependency_direction(role: str) -> None:
    problems = [p for m in ALL if m.role == role for p in direction_problems(m)]
    assert not problems, _report(problems)


def test_nothing_imports_sim() -> None:
    problems = [p for m in ALL for p in sim_problems(m)]
    assert not problems, _report(problems)


def test_fedtune_variables_are_read_only_in_common_runtime() -> None:
    problems = [p for m in ALL if m.path != RUNTIME for p in env_reads(m)]
    assert not problems, _report(problems)


def test_task_names_are_compared_only_in_common_tasks() -> None:
    problems = [p for m in ALL if _outside_tasks(m) for p in task_comparisons(m)]
    assert not problems, _report(problems)


# -- the checks themselves catch what they are for (so that none of them can pass vacuously) -------------------------

BAD_CLIENT = '''
from __future__ import annotations
from typing import TYPE_CHECKING
import os
from fedtune.common.errors import ConfigError
from fedtune.common import runtime
from fedtune.common.runtime import DEVICE
if TYPE_CHECKING:
    from fedtune.server.strategy import AdapterFedAvg
def late():
    import fedtune.audit.cli
    from fedtune import tools
    from ..server import app
    from .round import charge_round
    importlib.import_module("fedtune.sim.cli")
    return (os.environ["FEDTUNE_DEVICE"], os.environ.get("FEDTUNE_CACHE"), os.getenv(f"FEDTUNE_{x}"),
            os.environ.get(DEVICE.name, ""), os.environ.get(runtime.PRECISION.name), "FEDTUNE_OWNER" in os.environ,
            os.environ.get("HOME"))
def choose(task, name):
    os.environ["FEDTUNE_OWNER"] = "me"  # setting a variable for a child process is fine
    if task == "classify" or name in ("ner", "sft"):
        match name:
            case "sft":
                return 1
    return task == "other"
'''


def test_the_checks_catch_every_form_they_are_for() -> None:
    module = parse(BAD_CLIENT, "fedtune.client.bad", ROLES["client"] / "bad.py", "client")
    lines = sorted(int(p.split(":")[1]) for p in direction_problems(module))
    assert lines == [9, 11, 12, 13], direction_problems(module)  # TYPE_CHECKING, in a function, from-import, relative
    assert "imports fedtune.server.strategy: client may import only fedtune.client, fedtune.common" in \
        direction_problems(module)[0]
    assert [int(p.split(":")[1]) for p in sim_problems(module)] == [15]
    assert len(env_reads(module)) == 6 and all(":16:" in p or ":17:" in p for p in env_reads(module))
    assert [int(p.split(":")[1]) for p in task_comparisons(module)] == [21, 21, 23]
    sim = parse(BAD_CLIENT, "fedtune.sim.bad", ROLES["sim"] / "bad.py", "sim")
    assert direction_problems(sim) == [] and sim_problems(sim) == []
    common = parse("from fedtune.client.policy import NodePolicy\nfrom .ledger import chain\n", "fedtune.common.bad",
                   ROLES["common"] / "bad.py", "common")
    assert [p.split(" imports ")[1].split(":")[0] for p in direction_problems(common)] == ["fedtune.client.policy"]
