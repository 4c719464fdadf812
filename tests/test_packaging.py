"""herald as installed: every module imports from outside the checkout.

A caller that embeds herald (`ingest.api.HeraldAPI`) or runs it from another directory
gets only what the package declares; a module left out of `setup.cfg` works from the
checkout and fails everywhere else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folders that are not part of what herald installs.
NOT_INSTALLED = {"tests", "bench", "build", "dist"}


def _project_modules() -> list[str]:
    names = []
    for top in sorted(ROOT.iterdir()):
        if top.name in NOT_INSTALLED or top.name.startswith(".") or top.name.endswith(".egg-info"):
            continue
        for path in sorted(top.rglob("*.py")) if top.is_dir() else [top]:
            relative = path.relative_to(ROOT)
            if path.suffix != ".py" or "__pycache__" in relative.parts:
                continue
            if relative.parts[0] == "migrations" and path.name != "__init__.py":
                continue  # migration files are loaded by path, not imported
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join(parts))
    return names


def test_every_module_imports_outside_the_checkout(tmp_path: Path) -> None:
    modules = _project_modules()
    assert {"supervisor", "metrics", "ingest.api", "actors.tree"} <= set(modules)
    script = (
        "import importlib, sys\n"
        f"root = {str(ROOT)!r}\n"
        "assert root not in [p.rstrip('/') for p in sys.path], sys.path\n"
        "failed = []\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as exc:\n"
        "        failed.append(f'{name}: {exc}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
