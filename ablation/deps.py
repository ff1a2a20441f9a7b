"""Which source files each notebook's numbers depend on, for make (standard library only).

    python -m ablation.deps notebooks/02_train_saes.ipynb   # prints the files, one line

A stage depends on helpers.py, on the modules that define the ``h.<name>`` it calls, and on every
module those import, transitively (kernels.c with kernels.py); not on the rest of the package,
so a change to a plot's colour re-runs only the stages that draw it.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


def module_imports(module: str) -> set[str]:
    """The package modules one module imports at its top (``from .x import ...``)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1
            and n.module}


def helpers_owners() -> dict[str, str]:
    """Each name helpers.py offers -> the package module it comes from."""
    tree = ast.parse((ROOT / "helpers.py").read_text())
    owners = {a.asname or a.name: n.module.split(".", 1)[1] for n in tree.body
              if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("ablation.")
              for a in n.names}
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef)):  # helpers' own functions
        owners[fn.name] = "+".join(sorted({owners[x.id] for x in ast.walk(fn)
                                           if isinstance(x, ast.Name) and x.id in owners}))
    return owners


def stage_files(notebook: str | Path) -> list[str]:
    """The source files a notebook's results depend on, relative to the repository root."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    owners = helpers_owners()
    todo = {m for name in set(re.findall(r"\bh\.(\w+)", code)) if name in owners
            for m in owners[name].split("+") if m}
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= module_imports(module)
    files = ["helpers.py", *(f"ablation/{m}.py" for m in sorted(seen))]
    return files + (["ablation/kernels.c"] if "kernels" in seen else [])


if __name__ == "__main__":
    print(" ".join(stage_files(sys.argv[1])))
