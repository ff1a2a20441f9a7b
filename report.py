"""Run and render the report's notebooks for a papermill profile.

    python report.py PROFILE                      # validate the profile (and -p overrides) only
    python report.py PROFILE NOTEBOOK OUT.ipynb   # execute one notebook
    python report.py html OUT.ipynb               # self-contained HTML with a table of contents
    python report.py readme                       # results section of README.md from report/*/

Each notebook receives only the profile's parameters that its tagged `parameters` cell declares;
a profile key that no notebook declares, or an unknown profile, is an error before anything runs.
Extra `-p name value` pairs override the profile (values parsed as YAML).
"""

from __future__ import annotations

import argparse
import json
import re
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
    body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + toc, body, count=1)
    out = Path(notebook).with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


def _ci(v: dict) -> str:
    """'mean [lo, hi]' with three decimals."""
    return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def results_markdown(profile: str) -> str:
    """Markdown of one profile's endpoint table, falsification test and verdict, from its JSON."""
    folder = ROOT / "report" / profile
    try:
        abl = json.loads((folder / "04_initialization_ablation.json").read_text())
        lm = json.loads((folder / "01_cache_activations.json").read_text())
        gal = json.loads((folder / "03_galaxy_far_away.json").read_text())
    except FileNotFoundError:
        return f"*No results for profile `{profile}` yet: run `make report PROFILE={profile}`.*\n"
    lines = [f"**Model** `{lm['model_name']}`, hook `{lm['hook']}` (d={lm['d_model']}), "
             f"{lm['n_tokens']:,} cached tokens; |mu| = {lm['cached_layer']['mean_norm']:.2f} against "
             f"an RMS spread of {lm['cached_layer']['rms_from_mean']:.2f}, mean cosine of random "
             f"pairs {lm['cached_layer']['cos_raw']:.3f} raw. {abl['n_runs']} runs per cell.", "",
             "| configuration | data | mean-min cos. dist. | Hungarian cos. dist. | matched >= 0.7 | "
             "Hungarian L2 | activation corr. | FVU | dead |", "|" + " --- |" * 9]
    for key, row in abl["endpoint"].items():
        name, prep = key.split("__")
        lines.append(f"| `{name}` | {prep} | " + " | ".join(_ci(row[m]) for m in (
            "mean_min", "hungarian", "matched_share", "hungarian_l2", "activation_corr", "fvu",
            "dead_fraction")) + " |")
    fvu = {k: v["fvu"]["mean"] for k, v in abl["endpoint"].items()}
    ra_raw = [v for k, v in fvu.items() if k.startswith("ra-") and k.endswith("__raw")]
    if ra_raw and "topk-random__raw" in fvu:
        lines += ["", f"Reconstruction on raw activations: the archetypal SAEs reach FVU "
                  f"{min(ra_raw):.2f} to {max(ra_raw):.2f} against {fvu['topk-random__raw']:.2f} for "
                  "`topk-random`" + (" (above 1: worse than predicting the data mean, so their "
                                     "agreement is that of models that barely left their start)"
                                     if max(ra_raw) > 1 else "") + "."]
    lines += ["", "Falsification test (endpoint distance, archetypal minus `topk-random`; "
              "95% bootstrap interval over runs):", ""]
    for t in abl["falsification"]:
        lines.append(f"- `{t['challenger']}`, {t['metric']}, {t['preprocessing']}: "
                     f"{t['difference']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]: {t['outcome']}")
    lines += ["", "Geometry-free control (correlation of activation-matched latents on held-out "
              "activations, archetypal minus `topk-random`; above 0: archetypal runs agree more):", ""]
    for t in abl["geometry_free"]:
        lines.append(f"- `{t['challenger']}`, {t['preprocessing']}: {t['difference']:+.3f} "
                     f"[{t['lo']:+.3f}, {t['hi']:+.3f}]: {t['outcome']}")
    lines += ["", "Stabilization (change of the distance over training, end minus step 0, "
              "archetypal minus `topk-random`; below 0 would be an advantage of the constraint):", ""]
    for t in abl["stabilization_advantage"]:
        lines.append(f"- `{t['challenger']}` {t['challenger_change']:+.3f} vs `topk-random` "
                     f"{t['topk_change']:+.3f} ({t['metric']}, {t['preprocessing']}): "
                     f"{t['difference']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]")
    lines += ["", f"**Verdict:** {abl['verdict']} Galaxy effect on these activations: two k-means "
              f"dictionaries look {gal['kmeans_distance_raw']:.3f} apart raw, "
              f"{gal['kmeans_distance_centered']:.3f} centered (random: {gal['random_distance']:.3f}).",
              ""]
    return "\n".join(lines)


def stage_seconds(profile: str) -> dict[str, float]:
    """Seconds each notebook of a profile's last run took, from its JSON."""
    out = {}
    for f in sorted((ROOT / "report" / profile).glob("[0-9][0-9]_*.json")):
        out[f.stem] = json.loads(f.read_text()).get("seconds", float("nan"))
    return out


def _geometry_free_sentence(abl: dict) -> str:
    """How the activation-correlation control comes out, in one sentence."""
    outcomes = {t["outcome"] for t in abl["geometry_free"]}
    diffs = [t["difference"] for t in abl["geometry_free"]]
    how = {"archetypal agrees more": "agree more with each other than TopK runs do",
           "archetypal agrees less": "agree less with each other than TopK runs do",
           "no detectable difference": "agree no more and no less than TopK runs do"}
    said = how[outcomes.pop()] if len(outcomes) == 1 else \
        "agree more than TopK runs in some cells and less or no differently in others"
    return (f"By the geometry-free control (activation correlation of matched latents), "
            f"independently started archetypal runs {said} (differences {min(diffs):+.2f} to "
            f"{max(diffs):+.2f}).")


def answer_markdown() -> str:
    """The README's short answer, from each profile's verdict and geometry-free control."""
    parts = []
    for profile, label in (("default", "the offline GPT-NeoX"), ("smollm2", "the pretrained SmolLM2-135M")):
        path = ROOT / "report" / profile / "04_initialization_ablation.json"
        if not path.exists():
            parts.append(f"*Run `make report PROFILE={profile}` to fill in {label}.*")
            continue
        abl = json.loads(path.read_text())
        parts.append(f"On {label}: {abl['verdict']} {_geometry_free_sentence(abl)}")
    return "\n\n".join(parts)


def write_readme_results(profiles: tuple[str, ...] = ("default", "smollm2")) -> None:
    """Replace the README's generated blocks (answer, results) with the profiles' numbers."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    note = "<!-- generated by `python report.py readme` from report/*/*.json; do not edit -->"
    seconds = {p: stage_seconds(p) for p in profiles}
    times = "\n".join(f"| `{p}` | " + " | ".join(f"{v:.0f}" for v in sec.values())
                      + f" | {sum(sec.values()) / 60:.1f} |" for p, sec in seconds.items())
    blocks = {
        "answer": answer_markdown(),
        "results": "\n".join(f"#### Profile `{p}`\n\n{results_markdown(p)}" for p in profiles),
        "times": "| profile | 00 | 01 | 02 | 03 | 04 | total (min) |\n|" + " --- |" * 7 + "\n" + times,
    }
    for name, block in blocks.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text or end not in text:
            raise SystemExit(f"error: README.md lacks the markers {start} ... {end}")
        text = text[:text.index(start) + len(start)] + f"\n{note}\n{block}\n" + text[text.index(end):]
    readme.write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Command line: validate the profile and overrides, then run one notebook."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile")
    p.add_argument("notebook", nargs="?", help="omit to only validate the profile")
    p.add_argument("output", nargs="?")
    p.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["html"]:
        return print(export_html(argv[1]))
    if argv[:1] == ["readme"]:
        return write_readme_results()
    a = p.parse_args(argv)
    params = {**load_profile(a.profile), **{k: yaml.safe_load(v) for k, v in a.p}}
    check_params(params, sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb")))
    if a.notebook:
        run(a.notebook, a.output, params)


if __name__ == "__main__":
    main(sys.argv[1:])
