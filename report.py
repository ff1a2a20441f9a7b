"""Run the report's notebooks with a papermill profile and render them.

    python report.py check PROFILE [-p NAME VALUE ...]          # validate, print the run folder
    python report.py run PROFILE NOTEBOOK [-p NAME VALUE ...] [--output OUT.ipynb]
    python report.py html EXECUTED.ipynb                         # self-contained HTML page
    python report.py params [--check]                            # notebooks' parameters cells
    python report.py verify PROFILE [CELL ...]                   # retrain cells, compare with records

A profile is params/<PROFILE>.yaml: the parameters that differ from their defaults (declared once,
in ablation/parameters.py; the defaults are the `default` profile). Everything a profile produces
that is not committed goes to its run folder, runs/<PROFILE>/; `run` writes the executed notebook, its HTML and its
JSON to report/<PROFILE>/. With -p overrides (values parsed as YAML) a run goes to its own run
folder, runs/<PROFILE>+<overrides>/ (printed), which starts with links to the profile's caches and
SAE cells so upstream work is reused but never overwritten, and its figures and report pages go
inside that folder. Every parameter is checked (names, types, ranges) before anything runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import papermill as pm
import yaml

from ablation import parameters

ROOT = Path(__file__).resolve().parent
PARAMS = ROOT / "params"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
STAGE_JSON = re.compile(r"^\d\d_.*\.json$")
# The kernel's own log (a TCP transport warning on every start) is noise for a report run.
KERNEL_ARGS = ["--IPKernelApp.log_level=ERROR"]
HTML_STYLE = """<style>
.jp-InputArea-editor pre, .jp-OutputArea-output pre { white-space: pre-wrap; word-break: break-word; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { white-space: nowrap; }
.jp-OutputArea-output { overflow-x: auto; }
</style>"""


def fail(message: str) -> None:
    """Stop with one line on stderr and exit status 2."""
    raise SystemExit(f"error: {message}")


def load_profile(profile: str) -> dict:
    """The parameters of params/<profile>.yaml; a clear error naming the file, line and column."""
    try:
        return parameters.load_profile(profile)
    except ValueError as err:
        fail(str(err))


def declared(notebook: Path) -> dict:
    """The parameters a notebook's tagged parameters cell declares (papermill's inspection)."""
    return pm.inspect_notebook(str(notebook))


def parse_overrides(pairs: list[list[str]]) -> dict:
    """-p NAME VALUE pairs, each value parsed as YAML (a clear error naming the bad one)."""
    out = {}
    for name, value in pairs:
        try:
            out[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            fail(f"-p {name} {value!r}: the value is not valid YAML")
    return out


def changes_results(overrides: dict) -> dict:
    """The overrides that change what a run computes: all but where it runs (parameters.PLACEMENT)."""
    return {k: v for k, v in overrides.items() if k not in parameters.PLACEMENT}


def run_folder(profile: str, overrides: dict) -> Path:
    """runs/<profile>, or runs/<profile>+<overrides> when any changes results (unless -p run_dir)."""
    if "run_dir" in overrides:
        return Path(overrides["run_dir"])
    overrides = changes_results(overrides)
    if not overrides:
        return Path("runs") / profile
    text = ",".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in sorted(overrides.items()))
    slug = re.sub(r"[^A-Za-z0-9_.=,-]+", "", text)
    if len(slug) > 48:
        slug = slug[:39] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return Path("runs") / f"{profile}+{slug}"


def resolve(profile: str, overrides: dict, notebook: Path | None = None) -> dict:
    """All parameters of a run, checked before any work: names, types and ranges."""
    params = {**load_profile(profile), **overrides}
    decl = {nb: declared(nb) for nb in NOTEBOOKS}
    known = set().union(*decl.values())
    unknown = sorted(set(params) - known)
    if unknown:
        fail(f"unknown parameter(s) {unknown}; the notebooks declare {sorted(known)}")
    if notebook is not None:
        stray = sorted(set(changes_results(overrides)) - set(declared(notebook)) - {"run_dir", "figures_dir"})
        if stray:
            fail(f"{notebook.name} does not declare {stray}; its parameters are "
                 f"{sorted(declared(notebook))}")
    try:
        parameters.check_parameters(params)
        parameters.check_together({**{n: parameters.default(n) for n in parameters.PARAMETERS},
                                   **params})
        parameters.resolve_device(params.get("device", "auto"))
    except ValueError as err:
        fail(f"params/{profile}.yaml with the overrides: {err}")
    run_dir = run_folder(profile, overrides)
    figures = overrides.get("figures_dir", params.get("figures_dir", "figures")
                            if not changes_results(overrides) else str(run_dir / "figures"))
    return {**params, "run_dir": str(run_dir), "figures_dir": figures}


def seed_from(parent: Path, child: Path) -> None:
    """Give a new override run folder links to the profile's model, caches and shared starts.

    Files are linked one by one inside real folders; a stage that recomputes one writes a new
    file over the link (every write goes through a temporary name and a rename), never into the
    profile's copy. Stage JSON, figures, report pages, locks and checkpoints (a render in
    progress of the profile's own) are not linked.
    """
    if child.exists() or not parent.is_dir():
        return
    for src in parent.rglob("*"):
        rel = src.relative_to(parent)
        if src.is_dir() or rel.parts[0] in ("figures", "report") or rel.name.endswith(".lock") or \
                rel.suffix == ".ckpt" or (len(rel.parts) == 1 and STAGE_JSON.match(rel.name)):
            continue
        (child / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src.resolve(), child / rel)


def run(notebook: Path, params: dict, output: Path) -> Path:
    """Execute a notebook with the parameters it declares, from the repository root; the executed
    copy goes to output, its JSON and HTML beside it."""
    own = {k: v for k, v in params.items() if k in declared(notebook)}
    output.parent.mkdir(parents=True, exist_ok=True)
    # Figures are embedded in the report: the kernel draws inline even where the caller's
    # environment (a test run, a headless shell) asks matplotlib for Agg.
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # What a stage prints (one line per trained cell, its findings) goes to this run's log as it
    # happens; progress bars and figures stay in the executed notebook.
    pm.execute_notebook(str(notebook), str(output), parameters=own, cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False, log_output=False,
                        stdout_file=sys.stdout, extra_arguments=KERNEL_ARGS)
    strip_widgets(output)
    produced = ROOT / params["run_dir"] / f"{notebook.stem}.json"
    if produced.exists():
        shutil.copy2(produced, output.with_suffix(".json"))
    export_html(output)
    return output


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def strip_widgets(notebook: str | Path) -> None:
    """Drop progress-widget state from an executed notebook: the saved widget models, and each
    widget output's view (its text fallback, the finished bar, stays)."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            data.pop(WIDGET_VIEW, None)
        if cell.get("outputs"):
            cell.outputs = [o for o in cell.outputs if o.get("output_type") != "display_data" or o.get("data")]
    nbformat.write(nb, str(notebook))


def export_html(notebook: str | Path) -> Path:
    """Write notebook.html beside an executed notebook: images embedded, a table of contents."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4)
    body, _ = HTMLExporter(template_name="lab", embed_images=True).from_notebook_node(nb)
    heads = re.findall(r'<h([12]) id="([^"]+)">(.*?)<a class="anchor-link"', body)
    items = "".join(f'<li class="toc-h{lvl}"><a href="#{anchor}">{text}</a></li>'
                    for lvl, anchor, text in heads)
    toc = (f'<nav class="toc" style="margin:1em 2em;padding:.5em 1em;border:1px solid #ddd">'
           f"<strong>Contents</strong><ul>{items}</ul></nav>")
    body = body.replace("</head>", HTML_STYLE + "</head>", 1)
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + toc, body, count=1)
    out = Path(notebook).with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def write_parameter_cells(check: bool = False) -> list[str]:
    """Regenerate every notebook's tagged parameters cell from ablation.parameters.PARAMETERS (for
    the parameters it declares); with check, only list the notebooks whose cell differs."""
    import nbformat

    stale = []
    for path in NOTEBOOKS:
        nb = nbformat.read(str(path), as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        text = parameters.parameters_cell(list(declared(path)))
        if cell.source != text.rstrip("\n"):
            stale.append(path.name)
            if not check:
                cell.source = text.rstrip("\n")
                nbformat.write(nb, str(path))
    return stale


def verify(profile: str, cells: list[str]) -> list[dict]:
    """Retrain a profile's cells (each 'configuration__preprocessing'; none: the cheapest pair that
    decides a verdict) from scratch in a temporary folder, on the profile's activation caches, and
    print every budget's distance beside its committed record and the spread of a second seed set.
    Returns the rows printed."""
    import tempfile
    from dataclasses import replace

    from ablation import grid, records
    from ablation import verify as check

    os.chdir(ROOT)
    nb02 = ROOT / "notebooks" / "02_train_saes.ipynb"
    params = parameters.resolve_parameters({**{n: None for n in declared(nb02)}, "profile": profile})
    if not (Path(params["run_dir"]) / "acts_train.json").is_file():
        fail(f"{params['run_dir']} holds no activation cache: run `make report PROFILE={profile}` (stages 00-01) first")
    known = {f"{n}__{p}" for n in params["configurations"] for p in params["preprocessing"]}
    bad = sorted(set(cells) - known)
    if bad:
        fail(f"CELLS={bad} are not cells of profile {profile!r}; choose from {sorted(known)}")
    chosen = [tuple(c.split("__")) for c in cells] or check.cheapest_pair(params["cells_dir"], params["preprocessing"])
    out, committed, fresh = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, prep in chosen:
            path = records.record_path(params["cells_dir"], name, prep)
            old = records.read_record(path)
            if old is None:
                fail(f"{path} is missing or broken: nothing to verify")
            job = replace(grid.cell_jobs(params, [name], [prep], tmp, [Path(tmp) / "cells"])[0], fresh=True)
            if old["key"] != job.key:
                print(f"note: {path} was made for another definition than this checkout's; comparing anyway")
            new = grid.run_cell(job)["record"]
            rows = check.compare(old, new)
            print("\n".join(check.report_lines(name, prep, rows, old["made"])), flush=True)
            out += [{"cell": f"{name}__{prep}", **r} for r in rows]
            committed.append(old)
            fresh.append(new)
    if len(chosen) == 2:
        pair = check.pair_difference(committed, fresh)
        spread = "-" if pair["seed_set_spread"] is None else f"{pair['seed_set_spread']:.4f}"
        print(f"{chosen[0][0]} - {chosen[1][0]} ({chosen[0][1]}) at the largest budget: committed "
              f"{pair['committed']:+.4f}, retrained {pair['retrained']:+.4f} (difference "
              f"{pair['retrained'] - pair['committed']:+.4f}; a second seed set moves it {spread})")
        out.append({"cell": "pair", **pair})
    return out


def main(argv: list[str] | None = None) -> None:
    """The command line: check, run, html or params."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("check", "run"):
        s = sub.add_parser(name)
        s.add_argument("profile")
        if name == "run":
            s.add_argument("notebook", type=Path)
            s.add_argument("--output", type=Path, help="the executed notebook (default: the report folder)")
        s.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    sub.add_parser("html").add_argument("notebook", type=Path)
    sub.add_parser("params").add_argument("--check", action="store_true")
    v = sub.add_parser("verify")
    v.add_argument("profile")
    v.add_argument("cells", nargs="*", help="configuration__preprocessing (default: the cheapest deciding pair)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.command == "verify":
        load_profile(a.profile)
        verify(a.profile, a.cells)
        return None
    if a.command == "html":
        return print(export_html(a.notebook))
    if a.command == "params":
        stale = write_parameter_cells(a.check)
        if a.check and stale:
            fail(f"parameters cells out of date in {stale}: run `python report.py params`")
        return print("rewrote " + ", ".join(stale) if stale else "every parameters cell is current")
    overrides = parse_overrides(a.p)
    notebook = None
    if a.command == "run":
        notebook = (ROOT / a.notebook).resolve() if not a.notebook.is_absolute() else a.notebook
        if notebook not in NOTEBOOKS:
            fail(f"{a.notebook} is not one of the report's notebooks {[n.name for n in NOTEBOOKS]}")
    params = resolve(a.profile, overrides, notebook)
    run_dir = Path(params["run_dir"])
    own_folder = changes_results(overrides)
    if own_folder and "run_dir" not in overrides:
        seed_from(ROOT / "runs" / a.profile, ROOT / run_dir)
    print(f"profile {a.profile!r}: run folder {run_dir}, figures in {params['figures_dir']}", file=sys.stderr)
    if notebook is not None:
        report = ROOT / ("report" / Path(a.profile) if not own_folder else run_dir / "report")
        run(notebook, params, a.output or report / notebook.name)


if __name__ == "__main__":
    main()
