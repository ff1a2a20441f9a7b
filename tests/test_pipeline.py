"""The whole pipeline through `make`, as a user runs it: outputs, incremental re-runs, dry runs,
corrupt files, overrides, the documented examples, and the rendered HTML in a real browser."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from ablation.configs import CONFIGURATIONS
from conftest import ROOT, run, tracked_copy

from readme import COMMITTED

pytestmark = pytest.mark.slow
STAGES = ["00_language_model", "01_cache_activations", "02_train_saes", "03_galaxy_far_away",
          "04_initialization_ablation"]


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under folder (the .venv link left out)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and ".venv" not in p.parts}


def science(repo: Path) -> dict:
    """Notebook 04's numbers of the smoke profile, without timings."""
    abl = json.loads((repo / "runs" / "smoke" / "04_initialization_ablation.json").read_text())
    return {k: abl[k] for k in ("endpoint", "falsification", "stabilization", "synthetic", "verdict")}


@pytest.fixture
def made_copy(made, tmp_path) -> Path:
    """A private copy of the made repository (links kept), for tests that change it."""
    return Path(shutil.copytree(made, tmp_path / "repo", symlinks=True))


def test_make_report_smoke_writes_every_output_and_nothing_tracked(made):
    report = made / "report" / "smoke"
    for stage in STAGES:
        assert (report / f"{stage}.ipynb").is_file(), stage
        assert (report / f"{stage}.html").stat().st_size > 10_000, stage
        assert json.loads((report / f"{stage}.json").read_text()), stage
        page = (report / f"{stage}.ipynb").read_text()  # no progress-widget state kept
        assert "widget-view+json" not in page and "widgets" not in json.loads(page)["metadata"], stage
    for fig in ("fig1_mean_min", "fig1_hungarian", "fig2_galaxy_toy", "00_lm_loss", "02_training_fvu"):
        for ext in ("png", "pdf"):
            assert (made / "runs" / "smoke" / "figures" / f"{fig}.{ext}").is_file()
    executed = json.loads((report / "04_initialization_ablation.ipynb").read_text())
    figures = [o for c in executed["cells"] for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(figures) >= 2  # drawn inline even though the tests run matplotlib on Agg
    html = (report / "04_initialization_ablation.html").read_text()
    assert 'class="toc"' in html and "data:image/png;base64" in html and "white-space: pre-wrap" in html
    produced = [str(p.relative_to(made)) for p in (made / "report" / "smoke").rglob("*")] + \
               [str(p.relative_to(made)) for p in (made / "runs").rglob("*") if p.is_file()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *produced], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(produced)  # `git status` stays clean
    assert (made / "README.md").read_text() == (ROOT / "README.md").read_text()  # smoke never feeds it
    log = (made / "runs" / "make-report-smoke.log").read_text()  # papermill's log: one line per cell
    cells = json.loads((report / "02_train_saes.json").read_text())["cells"]
    assert all(f"{c.replace('__', ' / ')}: " in log for c in cells) and len(cells) == 16


def test_make_report_is_incremental_and_rejects_unknown_profiles(made):
    again = run(["make", "report", "PROFILE=smoke"], made).stdout
    assert "report.py run" not in again  # nothing changed: no stage re-ran
    bad = run(["make", "report", "PROFILE=nope"], made, ok=False)
    assert bad.returncode != 0 and "profile='nope' is unknown" in bad.stderr
    assert not (made / "report" / "nope").exists() and not (made / "runs" / "nope").exists()


def test_a_clean_clone_runs_every_stage_and_a_dry_run_changes_nothing(tmp_path):
    repo = tracked_copy(tmp_path, outputs=True)
    before = digest(repo)
    plan = run(["make", "-n", "report"], repo).stdout
    for stage in STAGES:
        assert f"report.py run default notebooks/{stage}.ipynb" in plan, stage
    assert digest(repo) == before  # `make -n report` wrote nothing, README.md included


def test_a_corrupt_cell_is_named_rebuilt_and_gives_the_same_numbers(made, made_copy):
    cell = made_copy / "runs" / "smoke" / "saes" / "topk-random__raw.safetensors"
    raw = bytearray(cell.read_bytes())
    raw[-256:] = bytes(range(256))  # finite garbage where tensors were
    cell.write_bytes(bytes(raw))
    done = run(["make", "report", "PROFILE=smoke"], made_copy)
    assert "report.py run smoke notebooks/02_train_saes.ipynb" in done.stdout  # make noticed
    assert "notebooks/04_initialization_ablation.ipynb" in done.stdout  # and re-ran what reads it,
    assert "notebooks/03_galaxy_far_away.ipynb" not in done.stdout  # not the galaxy (the cache's)
    executed = (made_copy / "report" / "smoke" / "02_train_saes.ipynb").read_text()
    assert f"{cell.relative_to(made_copy)}: checksum mismatch" in executed  # and said which file
    assert science(made_copy) == science(made)  # rebuilt bit-identically (truncation: test_store.py)


def test_an_override_run_gets_its_own_folder_and_leaves_the_profile_alone(made_copy):
    profile = made_copy / "runs" / "smoke"
    before = digest(profile)
    done = run(["python", "report.py", "run", "smoke", "notebooks/03_galaxy_far_away.ipynb",
                "-p", "dose_sae_k", "1"], made_copy)
    own = made_copy / "runs" / "smoke+dose_sae_k=1"
    assert "run folder runs/smoke+dose_sae_k=1" in done.stderr
    assert json.loads((own / "03_galaxy_far_away.json").read_text())["dose_response"]
    assert (own / "figures" / "03_dose_response.png").is_file()
    assert (own / "report" / "03_galaxy_far_away.html").is_file()
    assert (own / "acts_train.npy").is_symlink()  # the profile's cache, reused
    assert digest(profile) == before  # the profile's JSON, figures and caches untouched
    assert "report.py run" not in run(["make", "report", "PROFILE=smoke"], made_copy).stdout


def readme_examples() -> list[str]:
    """The shell lines of the blocks marked <!-- tested --> in the README and RUNNING.md (where the
    README sends a reader for runs of their own), as a reader would type them."""
    text = (ROOT / "README.md").read_text() + (ROOT / "RUNNING.md").read_text()
    blocks = re.findall(r"<!-- tested -->\s*```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_documented_examples_run_as_written(made_copy):
    lines = readme_examples()
    assert len(lines) >= 3
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=made_copy, capture_output=True, text=True)
        assert done.returncode == 0, (line, done.stdout[-2000:], done.stderr[-2000:])


CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const errors = [...document.querySelectorAll('.jp-OutputArea-output')].filter(
      e => /Traceback \\(most recent call last\\)|An Exception was encountered|Warning:/.test(e.textContent)).length;
  const out = document.createElement('pre'); out.id = 'browser-check';
  out.textContent = `images=${imgs.length} broken=${broken} errors=${errors}`;
  document.body.appendChild(out); });</script>"""


def browser_check(html: Path, tmp: Path) -> dict:
    """Load a report page in headless Chromium; count images, broken images and error/warning cells."""
    page = tmp / html.name
    page.write_text(html.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"),
                    encoding="utf-8")
    dom = subprocess.run(
        [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'profile'}", "--virtual-time-budget=10000",
         "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="browser-check">images=(\d+) broken=(\d+) errors=(\d+)</pre>', dom)
    assert found, f"the check script did not run in {html.name}"
    return dict(zip(("images", "broken", "errors"), map(int, found.groups())))


def check_pages(folder: Path, tmp: Path) -> None:
    """Every page of a report folder loads with its images and without error or warning output."""
    pages = sorted(folder.glob("*.html"))
    assert pages, folder
    for page in pages:
        res = browser_check(page, tmp)
        numbers = json.loads(page.with_suffix(".json").read_text())
        has_figure = not page.stem.startswith("00_") or "heldout_loss" in numbers
        assert res["broken"] == 0 and res["errors"] == 0, (page.name, res)
        assert res["images"] >= 1 or not has_figure, (page.name, res)


needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="Chromium is not installed (.ci/run installs Debian's chromium)")


@needs_chromium
def test_freshly_rendered_smoke_pages_work_in_a_browser(made, tmp_path):
    check_pages(made / "report" / "smoke", tmp_path)


@needs_chromium
@pytest.mark.parametrize("profile", COMMITTED)
def test_committed_report_renders_in_a_browser(profile, tmp_path):
    if not (ROOT / "report" / profile).is_dir():
        pytest.skip(f"report/{profile}/ is not rendered (make report PROFILE={profile})")
    check_pages(ROOT / "report" / profile, tmp_path)


def test_make_lab_serves_the_notebooks(tmp_path):
    """`make lab` starts JupyterLab from the project's environment on the notebooks folder."""
    import os
    import signal
    import time
    import urllib.request

    repo = tracked_copy(tmp_path)
    proc = subprocess.Popen(["make", "lab", "LAB_ARGS=--no-browser --port=8765 --ServerApp.token=t"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline, body = time.time() + 90, ""
        while time.time() < deadline and not body:
            try:
                body = urllib.request.urlopen("http://127.0.0.1:8765/api/contents?token=t", timeout=5).read().decode()
            except OSError:
                time.sleep(1)
        names = {item["name"] for item in json.loads(body)["content"]}
        assert "00_language_model.ipynb" in names and "04_initialization_ablation.ipynb" in names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_the_readme_types_no_result_number_outside_its_generated_blocks():
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"<!-- (\w+):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    prose = re.sub(r"(?<!\d)\d{4}\.\d{5}(?!\d)", "", prose)  # arXiv identifiers are not results
    typed = re.findall(r"(?<![\w.])[-+]?\d+\.\d{3,}", prose)
    assert not typed, f"numbers typed into the README by hand (generate them in readme.py): {typed}"
    assert len(prose) < len(text)  # the blocks were found


def test_the_readme_stays_a_report_of_at_most_25_kb_with_the_answer_up_front():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 25_000, "README.md over 25 KB: move detail to the stage pages or CHANGELOG.md"
    head = "\n".join(text.splitlines()[:40])
    assert "<!-- tldr:start -->" in head and "What changed" not in text


def test_no_notebook_markdown_line_starts_a_blockquote():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                bad = [l for l in "".join(cell["source"]).splitlines() if l.lstrip().startswith(">")]
                assert not bad, f"{path.name}: {bad} renders as a blockquote"


def test_every_configuration_the_readme_names_is_in_its_glossary():
    text = (ROOT / "README.md").read_text()
    glossary = text.split("## Glossary", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([a-z0-9-]+)`", text)) & set(CONFIGURATIONS)
    assert {"topk-random", "ra-kmeans-shared"} <= named  # the README names configurations at all
    missing = [n for n in named if f"`{n}`" not in glossary and not (n.endswith("-free") and "`*-free`" in glossary)]
    assert not missing, f"configurations the README names but its glossary does not define: {missing}"


def test_the_committed_verdict_holds_on_a_second_seed_set():
    """The default profile's notebook 05 re-trains the decisive cells on seeds disjoint from the
    profile's: every outcome of the committed verdict must come out the same."""
    rob = json.loads((ROOT / "report" / "default" / "05_robustness.json").read_text())
    assert "second seed set" in rob["variants"], "render notebook 05 with the second seed set"
    rows = [r for r in rob["rows"] if r["variant"] == "second seed set"]
    profile = [r for r in rob["rows"] if r["variant"] == "profile"]
    assert len(rows) == len(profile) > 0 and not rob["skipped"]["second seed set"]
    moved = [(r["challenger"], r["reference"], r["metric"], r["outcome"], r["committed_outcome"])
             for r in rows if not r["holds"]]
    assert not moved, f"outcomes that move with the seeds: {moved}"


def test_a_larger_dictionarys_cost_comes_from_the_grids_own_timed_cells():
    from readme import larger_dictionary_hours
    cell = lambda tokens, seconds, **kw: {"convergence": {"tokens_trained": tokens},  # noqa: E731
                                          "train_seconds": seconds, **kw}
    grid = {"cells": {"topk-random__centered": cell(1e6, 100.0),  # 10,000 tokens/s
                      "ra-random-points__centered": cell(2e6, 400.0),  # 5,000 tokens/s
                      "topk-random__raw": cell(1e9, 1.0, resumed=True),  # a part time: not a rate
                      "ra-random-points__raw": cell(1e6, None)}}  # saved by older code
    # twice the atoms: twice the tokens at half the rate, 4 x (100 + 400) s
    assert larger_dictionary_hours(grid, 2.0) == pytest.approx(2000 / 3600)
    grid["cells"]["ra-random-points__centered"]["train_seconds"] = None
    assert larger_dictionary_hours(grid, 2.0) is None  # no timed archetypal cell: no estimate


def test_the_robustness_sentence_says_per_kind_of_comparison_which_variants_moved_it():
    from readme import _robustness_sentence
    row = lambda v, kind, holds: {"variant": v, "comparison": kind, "holds": holds,  # noqa: E731
                                  "metric": "hungarian", "preprocessing": "centered",
                                  "outcome": "archetypal closer by more than the margin"}
    rob = {"variants": ["a", "b"], "rows": [row("profile", "matched start", True),
                                            row("a", "against topk-random", False),
                                            row("a", "matched start", True),
                                            row("b", "against topk-random", True),
                                            row("b", "matched start", True)]}
    said = _robustness_sentence(rob)
    assert said.startswith("on centered activations, against TopK from random starts the outcomes "
                           "hold under 1 of 2 variants (b) and move under a (to closer); at a matched start the "
                           "outcomes hold under 2 of 2 variants (a, b); not rendered yet: ")


def test_the_tldr_reads_the_two_comparisons_together_only_when_each_is_unanimous():
    from ablation import labels
    from readme import _reading
    row = lambda kind, c, ref, outcome: {"comparison": kind, "challenger": c, "reference": ref,  # noqa: E731
                                         "outcome": outcome, "metric": "hungarian",
                                         "preprocessing": "centered"}
    end = lambda v: {"hungarian": {"mean": v}}  # noqa: E731
    abl = {"falsification": [row("against topk-random", "ra-random-points", "topk-random", labels.EQUIVALENT),
                             row("matched start", "ra-random-points", "topk-random-points", labels.CLOSER)],
           "endpoint": {"topk-random__centered": end(0.38), "topk-random-points__centered": end(0.44)}}
    assert "(`topk-random-points` 0.440 against `topk-random` 0.380)" in _reading(abl)
    abl["falsification"][0]["outcome"] = labels.CLOSER
    assert "beyond both baselines" in _reading(abl)
    abl["falsification"][1]["outcome"] = labels.EQUIVALENT
    assert "comes from the start, not the constraint" in _reading(abl)
    abl["falsification"][1]["outcome"] = labels.UNDECIDED
    assert _reading(abl) == ""  # not unanimous: the outcomes speak for themselves


def test_reused_cells_add_the_training_seconds_they_recorded_and_count_those_that_did_not():
    from readme import _reused_note
    grid = {"cells": {"a__raw": {"reused": True, "train_seconds": 1200.4},
                      "b__raw": {"reused": True, "train_seconds": None},  # saved by older code
                      "c__raw": {"reused": False, "train_seconds": 50.0}}}
    assert _reused_note("p", grid, ["a__raw", "b__raw"]) == (
        "`p`: stage 02 reused 2 of 3 cells trained by earlier runs of the stage; their training took "
        "1,200 s more (1 of them, saved by older code, did not record theirs).")
    grid["cells"]["b__raw"]["train_seconds"] = 99.6
    assert _reused_note("p", grid, ["a__raw", "b__raw"]).endswith("took 1,300 s more.")
    assert _reused_note("p", grid, ["c__raw"]).endswith("took 50 s more.")
    grid["cells"]["a__raw"]["train_seconds"] = grid["cells"]["b__raw"]["train_seconds"] = None
    assert _reused_note("p", grid, ["a__raw", "b__raw"]).endswith(
        "; saved by older code, they did not record their training time.")  # not "took 0 s more"


def test_the_readme_names_each_flagged_cell_once_not_each_test_it_leaves_out():
    from readme import load, results_markdown
    abl = load("smollm2", "04")
    if abl is None or not abl["tests_skipped"]:
        pytest.skip("the committed smollm2 render leaves no test out")
    said = results_markdown("smollm2", explain=False)
    flagged = [k for k, reasons in abl["quality_gate"].items() if reasons]
    sentence = next(line for line in said.splitlines() if line.startswith("The quality gate flags"))
    assert all(f"`{key.split('__')[0]}` " in sentence for key in flagged)
    assert f"the {len(abl['tests_skipped'])} tests that need one of them are left out" in said
    assert "Legends as above." in said and "Legends as above." not in results_markdown("smollm2")


def test_a_further_matched_start_is_explained_only_when_the_archetypal_cell_stayed_at_its_start():
    from ablation import labels
    from readme import _pinned
    row = {"comparison": "matched start", "challenger": "ra-random-points", "reference": "topk-random-points",
           "outcome": labels.FURTHER, "metric": "hungarian", "preprocessing": "centered"}
    st = lambda step0, end: {"step0": step0, "end": end}  # noqa: E731
    abl = {"falsification": [row], "equivalence_margin": 0.05,
           "stabilization": {"ra-random-points__centered": st(0.370, 0.352),
                             "topk-random-points__centered": st(0.370, 0.266)}}
    grid = {"delta_over_median_norm": {"centered": 0.0131}}
    assert _pinned(abl, grid) == (
        " `ra-random-points` barely left its start (0.370 at step 0, 0.352 at the end; delta is 1.3% of "
        "the candidates' median norm), while `topk-random-points` from the same points moved to 0.266: "
        "here the constraint pins each run's atoms to its own points.")
    abl["stabilization"]["ra-random-points__centered"] = st(0.284, 0.373)  # it moved: no such reading
    assert _pinned(abl, grid) == ""
    abl["stabilization"]["ra-random-points__centered"] = st(0.370, 0.352)
    row["outcome"] = labels.CLOSER
    assert _pinned(abl, grid) == ""


def test_the_readme_tabulates_each_dictionary_size_for_the_cells_whose_runs_start_apart():
    from readme import _sizes_markdown

    row = lambda n, c, s0, e: {"n_latents": n, "cell": f"{c}__centered", "step0": s0, "end": e}  # noqa: E731
    rows = [row(512, "topk-random", 0.746, 0.379), row(512, "ra-kmeans-shared", 0.0, 0.363),
            row(1024, "topk-random", 0.702, 0.401), row(1024, "ra-kmeans-shared", 0.0, 0.371)]
    table = _sizes_markdown({"dictionary_sizes": rows})
    assert "| 512 | 0.746 -> 0.379 |" in table and "| 1,024 | 0.702 -> 0.401 |" in table
    assert "ra-kmeans-shared" not in table and "(centered)" in table  # a shared start is 0 apart by design
    assert _sizes_markdown({"dictionary_sizes": rows[:2]}) == ""  # one size: nothing to compare


def test_flagged_cells_are_named_once_per_configuration_and_reason():
    from readme import _flagged_cells
    moving = {"converged": False, "slope": -0.02, "lo": -0.03, "hi": -0.01}
    abl = {"quality_gate": {"topk-random__raw": ["not converged"], "topk-random__centered": ["not converged"],
                            "ra-kmeans-shared__raw": ["held-out FVU 0.56 > 0.4 (of the data's variance)"]},
           "convergence": {"topk-random__raw": moving, "topk-random__centered": moving,
                           "ra-kmeans-shared__raw": {"converged": True}}}
    assert _flagged_cells(abl, list(abl["quality_gate"])) == \
        "`topk-random` raw and centered (still moving), `ra-kmeans-shared` raw (FVU 0.56 > 0.4)"


def test_the_robustness_sentence_says_how_the_baseline_and_a_challenger_move_with_dictionary_size():
    from readme import _size_clause
    row = lambda n, c, e: {"n_latents": n, "cell": f"{c}__centered", "step0": 0.5, "end": e}  # noqa: E731
    rows = [row(512, "topk-random", 0.379), row(512, "ra-kmeans-independent", 0.361),
            row(2048, "topk-random", 0.45), row(2048, "ra-kmeans-independent", 0.30),
            row(1024, "topk-random", 0.418), row(1024, "ra-kmeans-independent", 0.322)]
    assert _size_clause({"dictionary_sizes": rows}) == (
        "; from 512 to 2,048 atoms, `topk-random` runs end 0.379 -> 0.450 apart and "
        "`ra-kmeans-independent` runs 0.361 -> 0.300")
    assert _size_clause({"dictionary_sizes": rows[:2]}) == "" and _size_clause({}) == ""


def test_the_readme_says_what_training_each_variants_own_cells_took():
    from readme import _variant_seconds
    cell = lambda s, resumed=False: {"train_seconds": s, "resumed": resumed}  # noqa: E731
    rob = {"variants": ["dictionary x2", "delta x4"],
           "cells": {"dictionary x2": {"topk-random__centered": cell(1179.4), "ra-kmeans-shared__centered": cell(434.0)},
                     "delta x4": {"topk-random__centered": cell(9999.0), "ra-kmeans-shared__centered": cell(120.2, True)}},
           "profile_cells": {"dictionary x2": [], "delta x4": ["topk-random"]}}  # not the variant's: not counted
    assert _variant_seconds(rob) == ("Training each variant's own cells took here: dictionary x2 1,613 s, "
                                     "delta x4 120 s (cells resumed from a checkpoint: 1; their earlier share "
                                     "is not counted).")
    rob["cells"]["delta x4"]["ra-kmeans-shared__centered"]["train_seconds"] = None  # saved by older code
    assert _variant_seconds(rob) == ""
