"""The teach profile's exercises: run them, keep what each found, and write TEACHING.md.

    python teaching.py run [NAME ...]   # run exercises (all by default); report/teach/exercises/NAME.json
    python teaching.py student          # time a student's path: notebook 02 run unedited, as make lab runs it
    python teaching.py                  # (make TEACHING.md) fill templates/TEACHING.md.j2

Each exercise is one line a student types, the question it answers, and the numbers it reads from
the JSON its notebooks write. Its run time and outcome are measured by running it, committed under
report/teach/exercises/, and TEACHING.md's expected outcomes are generated from them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import jinja2

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "report" / "teach" / "exercises"
RUN = ".venv/bin/python report.py run teach notebooks/"
NB02, NB04, NB05 = "02_train_saes.ipynb", "04_initialization_ablation.ipynb", "05_robustness.ipynb"


def _both(over: str) -> str:
    """Notebooks 02 then 04 with the same overrides (one run folder: the records 04 reads)."""
    return f"{RUN}{NB02} {over} && {RUN}{NB04} {over}"


def _folder(over: dict) -> Path:
    """The run folder report.py gives these overrides."""
    import report

    return ROOT / report.run_folder("teach", over)


# name -> (question, the line, the overrides it runs with, the JSON it reads)
EXERCISES = {
    "no-cooldown": ("Does the verdict depend on the cooldown? Read every comparison on the trunk, where no "
                    "rate ever fell.", f"{RUN}{NB05} -p run_dir runs/teach -p variants '[\"no final decay\"]'",
                    {"run_dir": "runs/teach"}, "05_robustness.json"),
    "stop-early": ("What would a study that stopped every run at 0.4 M tokens conclude?",
                   _both("-p sae_budget 400000 -p n_budgets 2"), {"sae_budget": 400000, "n_budgets": 2},
                   "04_initialization_ablation.json"),
    "looser-constraint": ("Does a relaxation four times wider change the constraint's effect?",
                          _both("-p delta_share 0.4"), {"delta_share": 0.4}, "04_initialization_ablation.json"),
    "wider-margin": ("Which outcomes turn to 'equivalent' when differences below 0.1 count as none?",
                     f"{RUN}{NB04} -p equivalence_margin 0.1", {"equivalence_margin": 0.1},
                     "04_initialization_ablation.json"),
    "raw-only": ("How much of the archetypal runs' closeness on raw activations is the data mean?",
                 f"{RUN}{NB04} -p preprocessing '[raw]'", {"preprocessing": ["raw"]},
                 "04_initialization_ablation.json"),
}


def outcome(found: dict) -> dict:
    """What an exercise's JSON says, in the words TEACHING.md uses: each comparison's outcome and
    whether it settled (notebook 04), or each variant's rows (notebook 05); each claim's status."""
    if "verdict_over_budgets" in found:
        return {"comparisons": [{k: v[k] for k in ("challenger", "reference", "preprocessing", "tokens",
                                                   "difference", "outcome", "settled")}
                                for v in found["verdict_over_budgets"]],
                "claims": {c["claim"]: c["status"] for c in found["claims"]},
                "galaxy": found.get("galaxy")}
    return {"rows": [{k: r[k] for k in ("variant", "challenger", "reference", "preprocessing", "difference",
                                        "outcome", "holds")}
                     for r in found["rows"] if r["metric"] == "hungarian"]}


def run(names: list[str]) -> None:
    """Run the named exercises (all when none) as a student would, timed; keep each outcome."""
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or list(EXERCISES):
        question, line, over, produced = EXERCISES[name]
        started = time.perf_counter()
        subprocess.run(["bash", "-c", line], cwd=ROOT, check=True)
        seconds = time.perf_counter() - started
        found = json.loads((_folder(over) / produced).read_text())
        (OUT / f"{name}.json").write_text(json.dumps(
            {"name": name, "question": question, "line": line, "seconds": round(seconds),
             "outcome": outcome(found)}, indent=2, sort_keys=True) + "\n")
        print(f"{name}: {seconds:.0f} s", flush=True)


def student() -> None:
    """Time notebook 02 run unedited as JupyterLab runs it after `make lab` (from notebooks/, the
    profile from REPORT_PROFILE=teach), and keep what it did: report/teach/student_path.json."""
    import os

    started = time.perf_counter()
    subprocess.run([str(ROOT / ".venv" / "bin" / "papermill"), "02_train_saes.ipynb", "/dev/null", "--cwd", ".",
                    "--no-progress-bar", "--log-level", "ERROR"], cwd=ROOT / "notebooks", check=True,
                   env={**os.environ, "REPORT_PROFILE": "teach"})
    seconds = time.perf_counter() - started
    grid = json.loads((ROOT / "runs" / "teach" / "02_train_saes.json").read_text())
    reused = sum(c["reused"] for c in grid["cells"].values())
    (OUT.parent / "student_path.json").write_text(json.dumps(
        {"notebook": "02_train_saes.ipynb", "seconds": round(seconds, 1), "cells": len(grid["cells"]),
         "reused": reused}, indent=2, sort_keys=True) + "\n")
    print(f"notebook 02 unedited: {seconds:.1f} s, {reused} of {len(grid['cells'])} cells from their records")


def render() -> str:
    """TEACHING.md's text: the template filled from the exercises' JSON and the teach profile's."""
    from readme import load, short, tokens

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROOT / "templates"), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(short=short, tokens=tokens)
    done = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))}
    exercises = [{"name": n, "question": q, "line": line, **done.get(n, {})}
                 for n, (q, line, _, _) in EXERCISES.items()]
    path = OUT.parent / "student_path.json"
    return env.get_template("TEACHING.md.j2").render(
        exercises=exercises, abl=load("teach", "04"), gal=load("teach", "03"), grid=load("teach", "02"),
        student=json.loads(path.read_text()) if path.is_file() else None)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2:])
    elif sys.argv[1:2] == ["student"]:
        student()
    else:
        (ROOT / "TEACHING.md").write_text(render())
