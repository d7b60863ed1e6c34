"""The binding dependency directions of STYLE.md, checked on every import statement (top level or not)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "keeltune"
# the torch-free foundation every part may import: atomic file writes, and the run folder's names
BASE = {"atomic", "run_folder"}
# what each part may import from keeltune (besides itself)
ALLOWED = {
    "atomic": set(),
    "run_folder": {"atomic"},
    "config": BASE,
    "distributed": BASE | {"config"},
    "data_pipeline": BASE | {"config"},
    "sharding": BASE | {"config", "distributed"},
    "eval": BASE | {"config", "distributed", "data_pipeline"},
    "training": BASE | {"config", "distributed", "sharding", "data_pipeline", "eval"},
    "launcher": BASE | {"config", "distributed", "training", "sharding", "data_pipeline", "eval", "review"},
    "review": BASE,  # the review's files, page server and statistics: a login node serves them
    "sweep": BASE | {"config", "launcher", "training"},  # submits trials like keeltune launch; W&B's mode
    "demo": BASE | {"config", "launcher", "training", "sharding", "data_pipeline", "eval"},
    "cli": BASE
    | {
        "config",
        "distributed",
        "launcher",
        "training",
        "sharding",
        "data_pipeline",
        "eval",
        "demo",
        "review",
        "sweep",
    },
}
TORCH_FREE = {
    "atomic",
    "run_folder",
    "config",
    "review",
    "sweep",
}  # may not import torch or deepspeed even inside a function


def _part(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py") if relative.parts[0] != "__init__.py" else ""


def _keeltune_imports(path: Path) -> set[tuple[str, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "keeltune" and len(parts) > 1:
                found.add((parts[1], name))
            elif parts[0] in {"torch", "deepspeed"}:
                found.add(("<" + parts[0] + ">", name))
    return found


def test_dependency_directions() -> None:
    violations = []
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 15
    for path in modules:
        part = _part(path)
        if not part:
            continue
        allowed = ALLOWED[part] | {part}
        for target, name in _keeltune_imports(path):
            if target.startswith("<"):
                if part in TORCH_FREE:
                    violations.append(f"{path.relative_to(REPO)} imports {name} ({part} imports no torch)")
                continue
            if target not in allowed:
                violations.append(f"{path.relative_to(REPO)} imports {name} ({part} may not import {target})")
    assert not violations, "\n".join(violations)


def test_login_node_commands_import_no_torch_or_deepspeed(tmp_path: Path) -> None:
    config = REPO / "configs" / "cluster" / "llama3-8b-sft.yaml"
    code = (
        "import sys\nfrom keeltune.cli import main\n"
        f"assert main(['config', {str(config)!r}, '--nproc', '16']) == 0\n"
        "import keeltune.launcher.run_dir, keeltune.launcher.local, keeltune.launcher.submit, keeltune.launcher.job\n"
        "import keeltune.launcher.entry, keeltune.launcher.rank_records, keeltune.training.manifest\n"
        "import keeltune.config.plan, keeltune.data_pipeline.prepare, keeltune.run_folder, keeltune.atomic\n"
        "import keeltune.review.server, keeltune.review.store, keeltune.review.results\n"
        "import keeltune.eval.bias.probes, keeltune.data_pipeline.counterfactual  # launch reads probe files\n"
        "import keeltune.sweep.driver, keeltune.sweep.report, keeltune.sweep.study, keeltune.sweep.trials\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'deepspeed', 'transformers'})\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


def _string_constants(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_no_backend_name_branches_outside_the_registry() -> None:
    """A backend's name is compared with nothing outside ``config/backends.py``: adding a backend is one module
    and one registry entry, not a hunt for if/elif chains."""
    from keeltune.config import BACKENDS

    registry = PACKAGE / "config" / "backends.py"
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == registry:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Compare, ast.Match)) and _string_constants(node) & set(BACKENDS):
                violations.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not violations, "\n".join(violations)


def test_regularizers_reach_the_model_only_through_the_backend_view() -> None:
    """From ``sharding`` the regularizers read only the Backend protocol and its view (``sharding.base``)."""
    folder = PACKAGE / "training" / "regularizers"
    modules = sorted(folder.glob("*.py"))
    assert len(modules) >= 5
    found = {
        (path.name, name)
        for path in modules
        for _, name in _keeltune_imports(path)
        if name.startswith("keeltune.sharding") and name != "keeltune.sharding.base"
    }
    assert not found, found
