"""A cell's record: written atomically, read back exactly, refused (and named) when broken or
made for another definition, found by key across folders, and one process at a time."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import numpy as np
import pytest

from ablation import records

KEY = {"configuration": "ra-kmeans-shared", "preprocessing": "centered", "code": "abc",
       "settings": {"sae_budget": 100, "delta_share": 0.1}}


def payload() -> dict:
    m = np.array([[np.nan, 0.1234567891, 0.2], [0.1234567891, np.nan, 0.3], [0.2, 0.3, np.nan]])
    return {"pairs": records.triangle(m), "runs": [1.0, float("nan"), 2.5]}


def test_pair_matrices_travel_as_upper_triangles_and_come_back_whole():
    m = np.array([[np.nan, 1, 2, 3], [1, np.nan, 4, 5], [2, 4, np.nan, 6], [3, 5, 6, np.nan]], float)
    assert records.triangle(m) == [1, 2, 3, 4, 5, 6]
    back = records.square(records.triangle(m), 4)
    assert np.array_equal(np.nan_to_num(back, nan=-1), np.nan_to_num(m, nan=-1))
    assert np.isnan(records.square([None, 1.0, 2.0], 3)[0, 1])  # null reads as NaN


def test_a_record_round_trips_rounded_with_nan_as_null(tmp_path):
    path = tmp_path / "cell.json"
    written = records.write_record(path, KEY, payload(), {"commit": "x"})
    read = records.read_record(path, KEY)
    assert read == written
    assert read["payload"]["pairs"][0] == 0.123457 and read["payload"]["runs"][1] is None
    assert len(path.read_text()) < 1000 and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("damage, said", [
    (lambda t: t[: len(t) // 2], "unreadable"),  # truncated
    (lambda t: t.replace("0.123457", "0.123458"), "fails its checksum"),  # edited
    (lambda t: "{}", "unreadable"),  # not a record
])
def test_a_broken_record_is_never_read_and_is_named(tmp_path, capsys, damage, said):
    path = tmp_path / "cell.json"
    records.write_record(path, KEY, payload(), {})
    path.write_text(damage(path.read_text()))
    assert records.read_record(path, KEY) is None
    err = capsys.readouterr().err
    assert said in err and str(path) in err


def test_a_record_of_other_code_or_parameters_is_not_used_and_says_what_differs(tmp_path, capsys):
    path = tmp_path / "cell.json"
    records.write_record(path, KEY, payload(), {})
    other = {**KEY, "code": "def", "settings": {**KEY["settings"], "sae_budget": 200}}
    assert records.read_record(path, other) is None
    err = capsys.readouterr().err
    assert "code" in err and "settings.sae_budget" in err and "delta_share" not in err


def test_find_record_takes_the_first_folder_whose_record_matches(tmp_path):
    a, b = tmp_path / "own", tmp_path / "committed"
    records.write_record(records.record_path(b, "ra-kmeans-shared", "centered"), KEY, payload(), {"where": "b"})
    records.write_record(records.record_path(a, "ra-kmeans-shared", "centered"), {**KEY, "code": "old"},
                         payload(), {"where": "a"})
    found, path = records.find_record([a, b], "ra-kmeans-shared", "centered", KEY)
    assert found["made"]["where"] == "b" and path.parent == b
    assert records.find_record([a], "ra-kmeans-shared", "centered", KEY) == (None, None)


def _hold(path, seconds, log):
    with records.record_lock(path):
        log.put(("in", time.monotonic()))
        time.sleep(seconds)
        log.put(("out", time.monotonic()))


def test_two_processes_never_hold_one_record_at_once(tmp_path):
    ctx = mp.get_context("spawn")
    log = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(tmp_path / "cell.json", 0.5, log)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    events = sorted((log.get() for _ in range(4)), key=lambda e: e[1])
    assert [e[0] for e in events] == ["in", "out", "in", "out"]


def test_records_are_small_json_with_their_key_and_provenance(tmp_path):
    made = records.made_by({"train": 1.0, "evaluate": 0.5}, "cpu")
    assert set(made) >= {"commit", "machine", "torch", "date", "seconds"}
    path = tmp_path / "cell.json"
    records.write_record(path, KEY, payload(), made)
    body = json.loads(path.read_text())
    assert body["key"] == KEY and body["key_digest"] == records.key_digest(KEY) and len(body["sha256"]) == 64
