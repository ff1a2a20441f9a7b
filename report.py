"""Run the report's notebooks with a papermill profile: `python report.py PROFILE NOTEBOOK OUT`.

Each notebook receives only the profile's parameters that its tagged `parameters` cell declares;
a profile key that no notebook declares, or an unknown profile, is an error before anything runs.
Extra `-p name value` pairs override the profile (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import papermill as pm
import yaml

ROOT = Path(__file__).resolve().parent
PARAMS = ROOT / "params"
NOTEBOOKS = ROOT / "notebooks"


def load_profile(profile: str) -> dict:
    """The parameters of params/<profile>.yaml; a clear error naming the known profiles."""
    path = PARAMS / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PARAMS.glob("*.yaml"))
        raise SystemExit(f"error: profile {profile!r} is unknown; choose one of {known}")
    return yaml.safe_load(path.read_text()) or {}


def declared(notebook: str | Path) -> set[str]:
    """Names set in a notebook's tagged parameters cell."""
    return set(pm.inspect_notebook(str(notebook)))


def check_params(params: dict, notebooks: list[Path]) -> None:
    """Fail when a parameter is declared by none of the notebooks."""
    known = set().union(*(declared(nb) for nb in notebooks))
    unknown = sorted(set(params) - known)
    if unknown:
        raise SystemExit(f"error: unknown parameter(s) {unknown}; the notebooks declare {sorted(known)}")


def run(notebook: str | Path, output: str | Path, params: dict) -> None:
    """Execute one notebook with the parameters it declares, from the repository root."""
    own = {k: v for k, v in params.items() if k in declared(notebook)}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook), str(output), parameters=own, cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False, log_output=False)


def main(argv: list[str] | None = None) -> None:
    """Command line: validate the profile and overrides, then run one notebook."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("notebook", nargs="?", help="omit to only validate the profile")
    p.add_argument("output", nargs="?")
    p.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    a = p.parse_args(argv)
    params = {**load_profile(a.profile), **{k: yaml.safe_load(v) for k, v in a.p}}
    check_params(params, sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")))
    if a.notebook:
        run(a.notebook, a.output, params)


if __name__ == "__main__":
    main(sys.argv[1:])
