"""What make re-runs: each stage depends on the modules it calls, and readme.py on no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ablation import deps

ROOT = Path(__file__).resolve().parents[1]
STAGES = {p.stem[:2]: p for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")}


def test_each_stage_depends_on_the_modules_it_calls_and_on_theirs():
    files = {s: set(deps.stage_files(p)) for s, p in STAGES.items()}
    assert all("helpers.py" in f and "ablation/parameters.py" in f for f in files.values())
    assert "ablation/decisions.py" in files["04"]
    assert not {"ablation/decisions.py", "ablation/train.py"} & (files["00"] | files["01"])
    assert "ablation/decisions.py" not in files["02"] | files["03"]  # a decision: stage 04 alone
    # stage 02 calls train_cell (grid.py), which trains with train.py on sae.py's models, whose
    # sparse products are kernels.py's compiled kernels.c
    assert {"ablation/grid.py", "ablation/train.py", "ablation/sae.py", "ablation/kernels.c"} <= files["02"]
    assert all((ROOT / f).is_file() for f in set().union(*files.values()))


def test_readme_generator_imports_neither_torch_nor_scipy():
    code = "import sys, readme; print(sorted({'torch', 'scipy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
