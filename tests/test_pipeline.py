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
    return {k: abl[k] for k in ("endpoint", "falsification", "stabilization", "verdict_over_budgets", "verdict")}


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
    for fig in ("fig1_mean_min", "fig1_hungarian", "fig2_galaxy_toy", "00_lm_loss", "02_training_fvu",
                "02_schedule", "fig3_verdict_over_budgets"):
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


def test_a_corrupt_record_is_named_retrained_and_gives_the_same_numbers(made, made_copy):
    record = made_copy / "report" / "smoke" / "cells" / "topk-random__raw.json"
    record.write_text(record.read_text().replace('"hungarian":[0.', '"hungarian":[0.9', 1))  # an edit
    done = run(["make", "report", "PROFILE=smoke"], made_copy)
    assert "report.py run smoke notebooks/02_train_saes.ipynb" in done.stdout  # make noticed
    assert "notebooks/04_initialization_ablation.ipynb" in done.stdout  # and re-ran what reads it,
    assert "notebooks/03_galaxy_far_away.ipynb" not in done.stdout  # not the galaxy (the cache's)
    executed = (made_copy / "report" / "smoke" / "02_train_saes.ipynb").read_text()
    assert "topk-random__raw.json: fails its checksum" in executed  # and said which file
    assert science(made_copy) == science(made)  # retrained to the same numbers (truncation: test_records.py)


def test_make_verify_retrains_a_deciding_pair_and_finds_its_records_again(made_copy):
    done = run(["make", "verify", "PROFILE=smoke"], made_copy)
    lines = [l for l in done.stdout.splitlines() if re.match(r"\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[-+]", l)]
    assert len(lines) == 2 * 3  # two cells, three budgets
    assert all(float(l.split()[3]) == 0.0 for l in lines)  # this machine: the same numbers
    assert "at the largest budget: committed" in done.stdout
    bad = run(["make", "verify", "PROFILE=smoke", "CELLS=topk-randm__raw"], made_copy, ok=False)
    assert "CELLS=['topk-randm__raw'] are not cells of profile 'smoke'" in bad.stderr


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


def test_the_readme_is_its_template_filled_from_the_committed_json():
    import readme

    assert readme.render() == (ROOT / "README.md").read_text(), "README.md is stale: run `make README.md`"
    code = [line for line in (ROOT / "readme.py").read_text().splitlines() if line.strip()]
    assert len((ROOT / "readme.py").read_text().splitlines()) <= 300 and len(code) > 50


def test_every_claim_word_in_the_readme_is_one_of_the_three_statuses():
    from ablation import labels

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- claims:start -->", 1)[1].split("<!-- claims:end -->", 1)[0]
    rows = [r for r in block.splitlines() if r.startswith("| ") and not r.startswith("| claim") and "---" not in r]
    assert len(rows) == len(labels.CLAIMS)
    cells = {c.strip() for r in rows for c in r.strip(" |").split(" | ")[2:]}
    assert cells <= {*labels.STATUSES, "not rendered yet"}, cells
    tldr = text.split("<!-- tldr:start -->", 1)[1].split("<!-- tldr:end -->", 1)[0]
    assert set(re.findall(r"\*\*(supported|contradicted|not established|[a-z ]+ed)\*\*", tldr)) <= set(labels.STATUSES)
    assert "FALSIFIED" not in text


def test_notebook_04_reads_as_a_story_in_at_most_120_lines_of_code():
    cells = json.loads((ROOT / "notebooks" / "04_initialization_ablation.ipynb").read_text())["cells"]
    code = [line for c in cells if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", [])
            for line in "".join(c["source"]).splitlines() if line.strip()]
    assert len(code) <= 120, len(code)


def committed_records() -> list[Path]:
    """Every cell record git tracks (a local smoke run's are ignored)."""
    listed = subprocess.run(["git", "ls-files", "report/*/cells/*.json", "report/*/robustness/*/cells/*.json"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in listed]


def test_the_committed_records_were_made_by_this_code():
    """A change to training or evaluation code invalidates every record: make it before a render,
    and re-render (make report) before committing it."""
    from ablation.grid import cell_code

    stale = [str(p.relative_to(ROOT)) for p in committed_records()
             if json.loads(p.read_text())["key"]["code"] != cell_code()]
    assert not stale, f"records made by other code than this checkout's ({cell_code()}): {stale[:5]}"


def test_records_are_small_and_whole():
    from ablation import records

    for path in committed_records():
        assert path.stat().st_size <= 200_000, path
        assert records.read_record(path) is not None, path


def test_notebook_05_narrates_at_least_as_much_as_notebook_04():
    words = {n: sum(len("".join(c["source"]).split()) for c in json.loads(
        (ROOT / "notebooks" / f"{n}.ipynb").read_text())["cells"] if c["cell_type"] == "markdown")
        for n in ("04_initialization_ablation", "05_robustness")}
    assert words["05_robustness"] >= words["04_initialization_ablation"], words
