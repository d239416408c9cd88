"""The hidden-states HDF5 file: schema attributes, reader, refusals, crash-safe writer, merge."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from stepprobe.data_collection.hdf5 import (KIND, SCHEMA_VERSION, HiddenStates, HiddenStatesWriter, TraceRecord,
                                            merge, parts_dir, write_arrays)
from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.layers import all_sites

H = 8
SITES = all_sites(2)
RULE = {"delimiter": "\n\n", "mode": "completes-occurrence-nonoverlapping", "token_ids": [198, 271]}


def _synthetic(num_problems=3, traces_per=2, seed=0):
    """Tables and features for write_arrays; trace t of problem p has (p + t) % 3 steps."""
    rng = np.random.default_rng(seed)
    steps = {k: [] for k in ("trace", "problem", "step", "position", "label")}
    traces = {k: [] for k in ("problem", "sample_index", "label", "num_steps", "num_tokens", "finish_reason")}
    problems = {"problem_id": [], "question": [], "gold": []}
    for p in range(num_problems):
        problems["problem_id"].append(f"p{p}")
        problems["question"].append(f"What is {p} + 1?\n\nSay it.")
        problems["gold"].append(str(p + 1))
        for t in range(traces_per):
            n, label = (p + t) % 3, (p + t) % 2
            ti = len(traces["problem"])
            for k in range(n):
                for key, v in (("trace", ti), ("problem", p), ("step", k), ("position", 5 * k + 3), ("label", label)):
                    steps[key].append(v)
            for key, v in (("problem", p), ("sample_index", t), ("label", label), ("num_steps", n),
                           ("num_tokens", 40), ("finish_reason", "stop" if t else "length")):
                traces[key].append(v)
    n = len(steps["trace"])
    features = {s: rng.standard_normal((n, H)).astype(np.float32) for s in SITES}
    return features, steps, traces, problems


def _write(path, model, **kw):
    features, steps, traces, problems = _synthetic(**kw)
    write_arrays(path, features=features, steps=steps, traces=traces, problems=problems, model=model,
                 boundary_rule=RULE, config={"collect": {"n": 2}, "record": {"dtype": "float32"}}, dtype="float32")
    return features, steps, traces, problems


def test_roundtrip_schema_and_reader(tmp_path, record_model_identity):
    path = tmp_path / "hs.h5"
    features, steps, traces, problems = _write(path, record_model_identity)
    with HiddenStates(path) as hs:
        assert hs.header["kind"] == KIND and hs.header["schema_version"] == SCHEMA_VERSION
        assert hs.sites == SITES and hs.hidden_size == H and hs.num_layers == 2
        assert hs.model == record_model_identity and hs.boundary_rule == RULE
        assert hs.header["config"]["collect"] == {"n": 2} and hs.header["layout"] == "single"
        assert hs.header["complete"] is True and "h5py" in hs.header["packages"]
        assert hs.num_steps == len(steps["trace"]) and hs.num_traces == 6
        np.testing.assert_array_equal(hs.steps["position"], steps["position"])
        np.testing.assert_allclose(hs.steps["rel_position"],
                                   np.array(steps["step"]) / np.array(traces["num_steps"])[steps["trace"]])
        assert hs.steps["label"].dtype == np.int8 and hs.traces["finish_reason"][0] == "length"
        assert list(hs.problems["question"]) == problems["question"]
        rows = np.array([4, 0, 2, 2])
        for s in SITES:
            got = hs.features(s, rows)
            assert got.dtype == np.float32 and got.shape == (4, H)
            np.testing.assert_array_equal(got, features[s][rows])
            np.testing.assert_array_equal(hs.features(s), features[s])
        t = 3
        np.testing.assert_array_equal(hs.steps["trace"][hs.trace_rows(t)], [t] * traces["num_steps"][t])
        assert hs.stack(["embed", "final_norm"], [1]).shape == (1, 2, H)
        with pytest.raises(StepprobeError, match="known sites: embed, layer_00"):
            hs.features("layer_07")
        hs.validate(record_model_identity)
    with h5py.File(path) as f:
        ds = f["features/layer_01"]
        assert ds.shape == (len(steps["trace"]), H) and ds.chunks[1] == H  # chunked along the step axis
        assert ds.dtype == np.float32


def test_float16_default_storage(tmp_path, record_model_identity):
    features, steps, traces, problems = _synthetic()
    write_arrays(tmp_path / "a.h5", features=features, steps=steps, traces=traces, problems=problems,
                 model=record_model_identity, boundary_rule=RULE, compression="gzip")
    with HiddenStates(tmp_path / "a.h5") as hs:
        assert hs.storage_dtype == "float16"
        np.testing.assert_array_equal(hs.features("embed"), features["embed"].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("attr,value,message", [
    ("kind", "something-else", "not a stepprobe hidden-states file"),
    ("schema_version", 99, "schema version 99"),
])
def test_refuses_wrong_kind_or_version(tmp_path, record_model_identity, attr, value, message):
    path = tmp_path / "hs.h5"
    _write(path, record_model_identity)
    with h5py.File(path, "r+") as f:
        f.attrs[attr] = value
    with pytest.raises(ArtifactMismatch, match=message):
        HiddenStates(path)


def test_refuses_other_model_and_non_hdf5(tmp_path, record_model_identity):
    path = tmp_path / "hs.h5"
    _write(path, record_model_identity)
    other = dict(record_model_identity, name="other", config_hash="1234")
    with pytest.raises(ArtifactMismatch, match="config_hash"):
        HiddenStates(path).validate(other)
    (tmp_path / "x.h5").write_text("not hdf5")
    with pytest.raises(ArtifactMismatch, match="not an HDF5 file"):
        HiddenStates(tmp_path / "x.h5")
    with pytest.raises(StepprobeError, match="not found"):
        HiddenStates(tmp_path / "missing.h5")
    with h5py.File(path, "r+") as f:  # a damaged file: fewer step rows than traces claim
        data = f["steps/trace"][:-1]
        del f["steps/trace"]
        f["steps/trace"] = data
    with pytest.raises(ArtifactMismatch, match="num_steps sums to"):
        HiddenStates(path).validate()


def test_pickle_and_dataloader_workers(tmp_path, record_model_identity):
    import torch
    from torch.utils.data import DataLoader, Dataset

    path = tmp_path / "hs.h5"
    features, *_ = _write(path, record_model_identity, num_problems=6)
    hs = HiddenStates(path)
    hs.features("embed", [0])  # opened in the parent before forking: workers must reopen

    class Rows(Dataset):
        def __len__(self):
            return hs.num_steps

        def __getitem__(self, i):
            return torch.from_numpy(hs.features("layer_01", [i])[0]), int(hs.steps["label"][i])

    got = torch.cat([x for x, _ in DataLoader(Rows(), batch_size=3, num_workers=2)]).numpy()
    np.testing.assert_array_equal(got, features["layer_01"])
    clone = pickle.loads(pickle.dumps(hs))
    np.testing.assert_array_equal(clone.features("final_norm"), features["final_norm"])


def _record(i, n_steps, seed=None):
    rng = np.random.default_rng(i if seed is None else seed)
    return TraceRecord(0, i % 2, 30, "stop", list(range(2, 2 + 3 * n_steps, 3)),
                       {s: rng.standard_normal((n_steps, H)).astype(np.float32) for s in SITES})


def _writer(path, model, **kw):
    return HiddenStatesWriter(path, sites=SITES, hidden_size=H, model=model, boundary_rule=RULE,
                              config={"record": {"x": 1}}, dtype="float32", commit_interval_s=0, **kw)


def test_writer_parts_resume_and_consolidate(tmp_path, record_model_identity):
    path = tmp_path / "hs.h5"
    w = _writer(path, record_model_identity)
    assert HiddenStates(path).num_steps == 0  # an empty, readable file from the start
    for i in range(3):
        w.add_problem(f"p{i}", "q", "g", [_record(i, i + 1), _record(10 + i, 0)])
    with pytest.raises(StepprobeError, match="already"):
        w.add_problem("p1", "q", "g", [])
    mid = HiddenStates(path)
    assert mid.layout == "parts" and not mid.complete and mid.num_steps == 6 and mid.num_traces == 6
    np.testing.assert_array_equal(mid.features("layer_00", [5]), _record(2, 3).features["layer_00"][2:3])
    # A killed commit leaves a half-written part and an unreferenced part: resume drops both.
    pdir = parts_dir(path)
    referenced = sorted(p.split("/")[1] for p, _, _ in mid.header["extra"]["parts"])
    assert sorted(p.name for p in pdir.iterdir()) == referenced  # merged small parts are gone
    (pdir / ".part-00042.h5.tmp").write_bytes(b"garbage")
    (pdir / "part-00099.h5").write_bytes(b"garbage")
    w2 = _writer(path, record_model_identity)
    assert w2.done_problem_ids == {"p0", "p1", "p2"}
    assert sorted(p.name for p in pdir.iterdir()) == referenced
    w2.add_problem("p3", "q", "g", [_record(3, 2)])
    w2.finish()
    hs = HiddenStates(path)
    assert hs.layout == "single" and hs.complete and not pdir.exists()
    assert hs.num_steps == 8 and list(hs.problems["problem_id"]) == ["p0", "p1", "p2", "p3"]
    np.testing.assert_array_equal(hs.features("final_norm", [6, 7]), _record(3, 2).features["final_norm"])
    np.testing.assert_array_equal(hs.traces["step_start"], [0, 1, 1, 3, 3, 6, 6])
    hs.validate(record_model_identity)
    # A finished file can be extended (it becomes the first part) and stays one file.
    w3 = _writer(path, record_model_identity)
    w3.add_problem("p4", "q", "g", [_record(4, 1)])
    w3.finish()
    hs = HiddenStates(path)
    assert hs.num_problems == 5 and hs.num_steps == 9 and not pdir.exists()
    np.testing.assert_array_equal(hs.features("embed", [0]), _record(0, 1).features["embed"])


def test_writer_refuses_mismatched_resume(tmp_path, record_model_identity):
    path = tmp_path / "hs.h5"
    _writer(path, record_model_identity).finish()
    with pytest.raises(ArtifactMismatch, match="storage_dtype"):
        HiddenStatesWriter(path, sites=SITES, hidden_size=H, model=record_model_identity, boundary_rule=RULE,
                           dtype="float16")
    with pytest.raises(ArtifactMismatch, match="config_hash"):
        _writer(path, dict(record_model_identity, config_hash="other"))
    with pytest.raises(ArtifactMismatch, match="boundary_rule"):
        HiddenStatesWriter(path, sites=SITES, hidden_size=H, model=record_model_identity,
                           boundary_rule={"delimiter": "Step"}, dtype="float32")
    w = _writer(path, dict(record_model_identity, config_hash="other"), overwrite=True)
    assert not w.done_problem_ids


def test_merge_shards(tmp_path, record_model_identity):
    feats = {}
    for shard in range(2):
        w = _writer(tmp_path / f"s{shard}.h5", record_model_identity, extra_attrs={"shard": f"{shard}/2"})
        for i in range(shard, 5, 2):
            w.add_problem(f"p{i}", f"q{i}", str(i), [_record(i, i % 3), _record(20 + i, 1)])
            feats[f"p{i}"] = np.concatenate([_record(i, i % 3).features["layer_01"], _record(20 + i, 1).features["layer_01"]])
        w.finish()
    out = merge([tmp_path / "s0.h5", tmp_path / "s1.h5"], tmp_path / "all.h5")
    hs = HiddenStates(out)
    hs.validate()
    assert hs.num_problems == 5 and hs.num_traces == 10 and hs.complete
    assert [m["shard"] for m in hs.header["merged_from"]] == ["0/2", "1/2"]
    for p, pid in enumerate(hs.problems["problem_id"]):
        rows = np.flatnonzero(hs.steps["problem"] == p)
        np.testing.assert_array_equal(hs.features("layer_01", rows), feats[pid])
        assert set(hs.traces["problem"][hs.steps["trace"][rows]]) <= {p}
    with pytest.raises(StepprobeError, match="exists"):
        merge([tmp_path / "s0.h5"], out)
    with pytest.raises(ArtifactMismatch, match="shards overlap"):
        merge([tmp_path / "s0.h5", tmp_path / "s0.h5"], tmp_path / "dup.h5")


_KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from stepprobe.data_collection.hdf5 import HiddenStatesWriter, TraceRecord
    from stepprobe.layers import all_sites
    sites = all_sites(2)
    model = {"name": "synthetic", "config_hash": "c0ffee", "vocab_hash": "beef", "hidden_size": 64,
             "num_hidden_layers": 2}
    w = HiddenStatesWriter(sys.argv[1], sites=sites, hidden_size=64, model=model, boundary_rule={},
                           dtype="float32", commit_interval_s=0)
    for i in range(int(sys.argv[2])):
        if f"p{i}" in w.done_problem_ids:
            continue
        feats = {s: np.full((3, 64), i, np.float32) for s in sites}
        w.add_problem(f"p{i}", "q", "g", [TraceRecord(0, 1, 9, "stop", [1, 4, 7], feats)])
        print(i, flush=True)
    w.finish()
""")


def test_killed_writer_leaves_readable_file_and_resumes(tmp_path):
    """SIGKILL a writer process at an arbitrary point, read what it left, rerun to completion."""
    script = tmp_path / "w.py"
    script.write_text(_KILL_SCRIPT)
    path, n = tmp_path / "hs.h5", 150
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(n)], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) >= 20:
            break
    time.sleep(0.05)  # somewhere inside the next commits
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    hs = HiddenStates(path)
    assert hs.layout == "parts" and not hs.complete
    got = hs.num_problems
    assert 20 <= got < n and hs.num_steps == 3 * got
    hs.validate()
    np.testing.assert_array_equal(hs.features("layer_01")[::3, 0], np.arange(got))
    subprocess.run([sys.executable, str(script), str(path), str(n)], check=True, stdout=subprocess.DEVNULL)
    hs = HiddenStates(path)
    assert hs.complete and hs.num_problems == n and hs.num_traces == n and hs.num_steps == 3 * n
    assert len(set(hs.problems["problem_id"])) == n
    np.testing.assert_array_equal(hs.features("embed")[::3, 0], np.arange(n))


def test_parts_file_without_its_blocks_is_refused(tmp_path, record_model_identity):
    path = tmp_path / "run" / "hs.h5"
    w = _writer(path, record_model_identity)
    w.add_problem("p0", "q", "g", [_record(0, 2)])
    moved = tmp_path / "hs.h5"
    moved.write_bytes(path.read_bytes())  # copied without hs.h5.parts/
    with pytest.raises(ArtifactMismatch, match="block file .* is missing"):
        HiddenStates(moved)


def test_float16_overflow_is_clipped_and_counted(tmp_path, record_model_identity, caplog):
    path = tmp_path / "hs.h5"
    w = HiddenStatesWriter(path, sites=SITES, hidden_size=H, model=record_model_identity, boundary_rule=RULE)
    rec = _record(0, 2)
    rec.features["layer_01"][0, 0] = 1e6
    w.add_problem("p0", "q", "g", [rec])
    with caplog.at_level("WARNING"):
        w.finish()
    hs = HiddenStates(path)
    assert hs.features("layer_01")[0, 0] == np.finfo(np.float16).max
    assert hs.header["extra"]["float16_clipped_values"] == 1 and "clipped" in caplog.text


def _mean_record(i, n_steps):
    rec = _record(i, n_steps)
    rng = np.random.default_rng(100 + i)
    rec.features.update({f"{s}.mean": rng.standard_normal((n_steps, H)).astype(np.float32) for s in SITES[1:3]})
    return rec


def test_step_means_parts_consolidate_merge_and_version_1(tmp_path, record_model_identity):
    """Schema 2's optional step means go through parts, resume, consolidation and merge; a
    version-1 file (no means) still reads, and a resume with other mean sites is refused."""
    import h5py

    path = tmp_path / "hs.h5"
    w = _writer(path, record_model_identity, mean_sites=SITES[1:3])
    w.add_problem("p0", "q", "g", [_mean_record(0, 2), _mean_record(1, 0)])
    mid = HiddenStates(path)
    assert mid.mean_sites == SITES[1:3] and mid.feature_names == SITES + [f"{s}.mean" for s in SITES[1:3]]
    np.testing.assert_array_equal(mid.features(f"{SITES[1]}.mean"), _mean_record(0, 2).features[f"{SITES[1]}.mean"])
    with pytest.raises(ArtifactMismatch, match="mean_sites"):
        _writer(path, record_model_identity)  # resuming without step means
    w = _writer(path, record_model_identity, mean_sites=SITES[1:3])
    w.add_problem("p1", "q", "g", [_mean_record(2, 3)])
    w.finish()
    hs = HiddenStates(path)
    assert hs.layout == "single" and hs.header["schema_version"] == SCHEMA_VERSION == 2
    hs.validate(record_model_identity)
    want = np.concatenate([_mean_record(0, 2).features[f"{SITES[2]}.mean"], _mean_record(2, 3).features[f"{SITES[2]}.mean"]])
    np.testing.assert_array_equal(hs.features(f"{SITES[2]}.mean"), want)
    with pytest.raises(StepprobeError, match="--step-mean"):
        hs.features(f"{SITES[0]}.mean")
    other = tmp_path / "b.h5"
    w = _writer(other, record_model_identity, mean_sites=SITES[1:3])
    w.add_problem("p9", "q", "g", [_mean_record(9, 1)])
    w.finish()
    merged = merge([path, other], tmp_path / "m.h5")
    m = HiddenStates(merged)
    assert m.mean_sites == SITES[1:3] and m.num_steps == 6
    np.testing.assert_array_equal(m.features(f"{SITES[2]}.mean")[5], _mean_record(9, 1).features[f"{SITES[2]}.mean"][0])
    # a version-1 file: no mean_sites attribute, schema_version 1
    v1 = tmp_path / "v1.h5"
    _write(v1, record_model_identity)
    with h5py.File(v1, "r+") as f:
        f.attrs["schema_version"] = 1
        del f.attrs["mean_sites"]
    old = HiddenStates(v1)
    old.validate(record_model_identity)
    assert old.mean_sites == [] and old.feature_names == SITES
