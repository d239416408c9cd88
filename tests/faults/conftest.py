"""Bad inputs for the refusal tests (issue 14): small files built once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers.synthetic_h5 import RULE, make_synthetic

IDENTITY = {"name": "synthetic-2x8", "config_hash": "synthetic0002", "vocab_hash": "vocab0002",
            "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2, "vocab_size": 100}


def synthetic_h5(path: Path, *, n_problems: int = 30, labels=None, nan_site: str | None = None,
                 questions=None, seed: int = 0) -> Path:
    """A small hidden-state file: 2 traces x 4 steps per problem, noise features.
    ``labels(p, j)`` gives trace j of problem p its label (default: alternating);
    ``nan_site``: one step of that site is NaN; ``questions``: the question of each problem."""
    return make_synthetic(path, n_problems=n_problems, traces_per_problem=2, steps=(4, 5),
                          labels=labels or (lambda p, j: (p + j) % 2), signal_site=None, seed=seed, model=IDENTITY,
                          config={"synthetic": True}, nan_site=nan_site, questions=questions, dtype="float32")


def write_traces(path: Path, model_path: str, problems: list[tuple[str, str, list[str]]],
                 model_name: str | None = None) -> Path:
    """:func:`helpers.traces_file.write_traces` for ``(problem_id, question, texts)`` lines, gold "1"."""
    from helpers.traces_file import write_traces as write

    return write(path, model_path, [(pid, q, "1", texts) for pid, q, texts in problems], model_name=model_name)


STEPS = ["First.\n\nSecond.\n\nSo 1.", "Hmm.\n\nIt is 1."]


def _parts_without_a_block(path: Path) -> Path:
    """A hidden-states file in the ``parts`` layout (a run in progress) whose block file was
    deleted, as a second writer of the same output used to leave it."""
    from stepprobe.data_collection.hdf5 import HiddenStatesWriter, TraceRecord, parts_dir
    from stepprobe.layers import all_sites

    sites = all_sites(IDENTITY["num_hidden_layers"])
    w = HiddenStatesWriter(path, sites=sites, hidden_size=IDENTITY["hidden_size"], model=IDENTITY,
                           boundary_rule=RULE, dtype="float32")
    rng = np.random.default_rng(0)
    for p in range(4):
        w.add_problem(f"p{p}", f"q{p}", "1", [TraceRecord(j, j % 2, 13, "stop", [3, 7], {
            s: rng.normal(size=(2, IDENTITY["hidden_size"])) for s in sites}) for j in range(2)])
    w.commit()
    for part in parts_dir(path).glob("*.h5"):
        part.unlink()
    return path


@pytest.fixture(scope="session")
def bad(tmp_path_factory, tiny_model_path) -> dict[str, Any]:
    """Every bad input of the refusal table, by name."""
    d = tmp_path_factory.mktemp("bad")
    files: dict[str, Path] = {}
    files["dir"] = d
    files["tiny"] = tiny_model_path
    files["afile"] = d / "afile.txt"
    files["afile"].write_text("not a directory\n")
    files["latin1"] = d / "latin1.jsonl"
    files["latin1"].write_bytes('{"question": "Was kostet der K\u00e4se?", "answer": "3"}\n'.encode("latin-1"))
    files["dup_ids"] = write_traces(d / "dup_ids.jsonl", tiny_model_path,
                                    [("a", "1+0?", STEPS), ("b", "0+1?", STEPS), ("a", "2-1?", STEPS)])
    files["no_steps"] = write_traces(d / "no_steps.jsonl", tiny_model_path,
                                     [("a", "1+0?", ["1", "one"]), ("b", "0+1?", ["1"])])
    files["hub_model"] = write_traces(d / "hub_model.jsonl", tiny_model_path, [("a", "1+0?", STEPS)],
                                      model_name="stepprobe-test/no-such-model")
    files["good_traces"] = write_traces(d / "good.jsonl", tiny_model_path,
                                        [("a", "1+0?", STEPS), ("b", "0+1?", STEPS)])
    files["good_h5"] = synthetic_h5(d / "good.h5")
    # Issue 25: a stepprobe header followed by lines of another format (STEP-paper JSONL).
    header = files["good_traces"].read_text(encoding="utf-8").splitlines()[0]
    files["mixed_traces"] = d / "mixed.jsonl"
    files["mixed_traces"].write_text(header + "\n" + '{"question": "1+0?", "response": "1"}\n', encoding="utf-8")
    # A question line over the documented limit, after a good one.
    from stepprobe.data_collection.problems import MAX_PROBLEM_CHARS

    files["huge_line"] = d / "huge.jsonl"
    files["huge_line"].write_text('{"question": "1+1?", "answer": "2"}\n{"question": "' + "x" * MAX_PROBLEM_CHARS
                                  + '", "answer": "1"}\n', encoding="utf-8")
    # An HDF5 file of another program, and a run in progress whose block file is gone.
    import h5py

    files["foreign_h5"] = d / "foreign.h5"
    with h5py.File(files["foreign_h5"], "w") as f:
        f.attrs["kind"] = "someone-elses-activations"
    files["broken_parts_h5"] = _parts_without_a_block(d / "broken.h5")
    files["nan_h5"] = synthetic_h5(d / "nan.h5", nan_site="layer_01")
    # Only problems 0 and 6 have an incorrect trace: find a split seed whose validation part
    # has neither (one class) while training has one.
    from stepprobe.training.data import VAL, TRAIN, split_problems

    files["one_class_h5"] = synthetic_h5(d / "one_class.h5", n_problems=12, labels=lambda p, j: 1 if p % 6 else j)
    mixed = {"p000", "p006"}
    ids = [f"p{p:03d}" for p in range(12)]
    files["one_class_seed"] = next(
        seed for seed in range(100)
        if not mixed & set((sp := split_problems(ids, seed=seed))[VAL]) and mixed & set(sp[TRAIN]))
    return files
