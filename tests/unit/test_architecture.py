"""The binding dependency directions of STYLE.md, checked on every import statement (top level or not)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "keeltune"
# what each part may import from keeltune (besides itself)
ALLOWED = {
    "config": set(),
    "distributed": {"config"},
    "data_pipeline": {"config"},
    "sharding": {"config", "distributed"},
    "eval": {"config", "distributed", "data_pipeline"},
    "training": {"config", "distributed", "sharding", "data_pipeline", "eval"},
    "launcher": {"config", "distributed", "training", "sharding", "data_pipeline", "eval"},
    "demo": {"config", "launcher", "training", "sharding", "data_pipeline", "eval"},
    "cli": {"config", "distributed", "launcher", "training", "sharding", "data_pipeline", "eval", "demo"},
}


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
                if part == "config":
                    violations.append(f"{path.relative_to(REPO)} imports {name} (config imports no torch)")
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
        "import keeltune.sharding.plan, keeltune.data_pipeline.prepare\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'deepspeed', 'transformers'})\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
