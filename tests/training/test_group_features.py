"""Group-aware features (issue 23): a signal that lives only in agreement between siblings is
found by the sweep and ranks right, single-trace features stay at chance, and a step's group
features read nothing of any trace after it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stepprobe.probes import group_features as G

NUM_LAYERS, HIDDEN = 4, 16
IDENTITY = {"name": "synthetic-4x16", "config_hash": "synthetic0001", "vocab_hash": "vocab0001",
            "model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": NUM_LAYERS, "vocab_size": 100}
RULE = {"delimiter": "\n\n", "mode": "completes-occurrence-nonoverlapping", "token_ids": [5, 7]}
AGREE_SITE = "layer_01"


def make_agreement(path: Path, *, n_problems: int = 160, traces_per_problem: int = 6, seed: int = 0) -> Path:
    """Each problem has its own centre and its own 'right' direction; a right trace sits at
    centre + 2.5 * right direction, a wrong one at centre + 2.5 * a direction of its own, so a
    trace alone (centre and directions random per problem) carries no signal: only whether it
    agrees with its siblings does. Only ``AGREE_SITE`` has that structure; the text does the
    same with numbers (right traces write the problem's right number, wrong ones their own)."""
    from stepprobe.data_collection.hdf5 import write_arrays
    from stepprobe.layers import all_sites

    rng = np.random.default_rng(seed)
    t_problem, t_label, t_steps = [], [], []
    for p in range(n_problems):
        labels = rng.random(traces_per_problem) < 0.5
        labels[:2] = True, False  # both outcomes in every problem
        for y in rng.permutation(labels):
            t_problem.append(p)
            t_label.append(int(y))
            t_steps.append(int(rng.integers(3, 7)))
    steps_a = np.array(t_steps)
    trace = np.repeat(np.arange(len(t_steps)), steps_a)
    step = np.concatenate([np.arange(k) for k in t_steps])
    n = len(trace)
    prob = np.array(t_problem)[trace]
    label = np.array(t_label)[trace]

    def unit(*shape):
        v = rng.normal(size=(*shape, HIDDEN))
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    centre, right, own = unit(n_problems) * 4.0, unit(n_problems), unit(len(t_steps))
    features = {}
    for site in all_sites(NUM_LAYERS):
        x = rng.normal(size=(n, HIDDEN)) * 0.5
        if site == AGREE_SITE:
            x += centre[prob] + 2.5 * np.where(label[:, None] == 1, right[prob], own[trace])
        else:
            x += rng.normal(size=(n, HIDDEN))
        features[site] = x.astype(np.float32)
    h5 = write_arrays(
        path, features=features,
        steps={"trace": trace, "problem": prob, "step": step, "position": step * 10 + 5, "label": label},
        traces={"problem": t_problem, "sample_index": [i % traces_per_problem for i in range(len(t_label))],
                "label": t_label, "num_steps": t_steps, "num_tokens": steps_a * 10 + 3,
                "finish_reason": ["stop"] * len(t_label)},
        problems={"problem_id": [f"p{p:03d}" for p in range(n_problems)],
                  "question": [f"q{p}" for p in range(n_problems)], "gold": [str(p) for p in range(n_problems)]},
        model=IDENTITY, boundary_rule=RULE, config={"synthetic": "agreement"})
    lines = [json.dumps({"kind": "stepprobe-traces", "schema_version": 1})]
    for p in range(n_problems):
        traces = []
        for t in np.flatnonzero(np.array(t_problem) == p):
            value = 100 + p if t_label[t] else 1000 + t
            traces.append({"sample_index": int(t % traces_per_problem),
                           "text": "".join(f"Step {k}: so far {value}\n\n" for k in range(t_steps[t])) + "Done.",
                           "num_tokens": int(steps_a[t] * 10 + 3), "extracted_answer": str(value),
                           "correct": bool(t_label[t])})
        lines.append(json.dumps({"problem_id": f"p{p:03d}", "prompt_token_ids": [1] * 20, "traces": traces}))
    (path.parent / "traces.jsonl").write_text("\n".join(lines) + "\n")
    return h5


@pytest.fixture(scope="module")
def agreement_h5(tmp_path_factory) -> Path:
    return make_agreement(tmp_path_factory.mktemp("agree") / "states.h5")


def test_sweep_finds_the_sibling_signal_and_single_trace_features_stay_at_chance(agreement_h5, tmp_path):
    from stepprobe.training import sweep

    cfg = sweep.Config(data=str(agreement_h5), out=str(tmp_path / "sw"), sites="layer_01,layer_02", group="group,text",
                       bootstrap=200, max_epochs=15, progress=False, plots=False)
    out = sweep.run(cfg)
    rows = {r["site"]: r for r in sweep.read_rows(out / "sweep.csv")}
    assert set(rows) == {"layer_01", "layer_02", "layer_01.group", "layer_02.group", "text.group"}
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["best_site_by_val"] in ("layer_01.group", "text.group")
    for site in ("layer_01.group", "text.group"):  # the group features rank a problem's traces right
        assert rows[site]["test_within_rank50"] > 0.85 and rows[site]["test_within_rank50_lo"] > 0.75, rows[site]
    for site in ("layer_01", "layer_02", "layer_02.group"):  # a trace alone, or noise against its siblings: chance
        assert rows[site]["test_within_rank50"] < 0.68 and rows[site]["test_within_rank50_lo"] < 0.55, rows[site]
        assert 0.35 < rows[site]["val_within_auroc"] < 0.65, rows[site]
    kinds = {w["kind"]: w for w in doc["winners"]}
    assert kinds["group"]["site"] == "layer_01.group" and kinds["group"]["test_auroc_minus_boundary"]["lo"] > 0


def test_untrained_text_agreement_ranks_the_synthetic_traces(agreement_h5):
    from stepprobe.data_collection.hdf5 import HiddenStates
    from stepprobe.training import metrics as M

    hs = HiddenStates(agreement_h5)
    vis, n_sib = G.siblings_of(hs)
    score = G.text_agreement(G.step_texts(hs), vis, n_sib)
    st = hs.steps
    rank = M.within_problem_rank(score, st["label"], st["trace"], st["problem"], st["rel_position"], 0.5)
    assert np.mean(list(rank.values())) > 0.9


def _random_rows(rng, n_problems=6, n_traces=5):
    problem, trace, step, position = [], [], [], []
    t = 0
    for p in range(n_problems):
        for _ in range(n_traces):
            k = int(rng.integers(1, 7))
            pos = np.cumsum(rng.integers(3, 30, size=k))  # traces advance at their own pace
            problem += [p] * k
            trace += [t] * k
            step += list(range(k))
            position += pos.tolist()
            t += 1
    order = rng.permutation(len(trace))  # row order must not matter
    return tuple(np.asarray(a)[order] for a in (problem, trace, step, position))


@pytest.mark.parametrize("align", ["time", "step"])
def test_a_steps_group_features_read_nothing_after_it(align):
    """Features of row i depend only on rows visible at i: changing every other row of any
    trace that comes later (a later step of its own trace; a sibling's boundary after i's
    position / step index) changes nothing, and changing a visible one does change them."""
    rng = np.random.default_rng(1)
    problem, trace, step, position = _random_rows(rng)
    n, h = len(trace), 8
    x = rng.normal(size=(n, h))
    texts = [f"a {rng.integers(0, 4)} b {rng.integers(0, 4)}" for _ in range(n)]
    stats = G.standardize_stats(rng.normal(size=(50, h)))  # fixed, as from a training file
    n_sib = np.full(n, 4)
    key = position if align == "time" else step

    def feats(xx, tt):
        vis = G.visible_siblings(problem, trace, step, position, align)
        return (G.group_features(xx, vis, n_sib, stats), G.group_deviation(xx, vis, stats),
                G.text_features(tt, vis, n_sib))

    base = feats(x, texts)
    changed_any = 0
    for i in rng.choice(n, size=25, replace=False):
        sib = (problem == problem[i]) & (trace != trace[i])
        future = ((trace == trace[i]) & (step > step[i])) | (sib & (key > key[i])) | (problem != problem[i])
        x2, t2 = x.copy(), list(texts)
        x2[future] = rng.normal(size=(int(future.sum()), h)) * 5
        for j in np.flatnonzero(future):
            t2[j] = f"z {rng.integers(10, 99)}"
        for a, b in zip(base, feats(x2, t2)):
            np.testing.assert_array_equal(a[i], b[i])
        visible = np.flatnonzero(sib & (key <= key[i]))
        if len(visible):
            x3 = x.copy()
            x3[visible[-1]] += 3.0
            changed_any += not np.array_equal(base[0][i], feats(x3, texts)[0][i])
    assert changed_any >= 5


def test_visible_siblings_pick_each_siblings_latest_boundary():
    #            trace 0: positions 5, 20; trace 1: 10, 15, 40; trace 2 (other problem): 1
    problem = np.array([0, 0, 0, 0, 0, 1])
    trace = np.array([0, 0, 1, 1, 1, 2])
    step = np.array([0, 1, 0, 1, 2, 0])
    position = np.array([5, 20, 10, 15, 40, 1])
    vis = G.visible_siblings(problem, trace, step, position, "time")
    assert [v.tolist() for v in vis] == [[], [3], [0], [0], [1], []]
    vis = G.visible_siblings(problem, trace, step, position, "step")
    assert [v.tolist() for v in vis] == [[2], [3], [0], [1], [1], []]


def test_train_writes_a_group_scorer_with_its_standardization(tmp_path, agreement_h5):
    """`stepprobe train` on a group feature writes a version-2 scorer that carries the base site,
    the alignment and the training file's standardization; loaded, with the offline features
    computed with that standardization, it separates the synthetic signal; the live checks accept .group and refuse what live
    capture cannot compute, each in one line."""
    import torch

    from stepprobe.data_collection.hdf5 import HiddenStates
    from stepprobe.errors import ArtifactMismatch
    from stepprobe.probes.checkpoint import GROUP_SCHEMA_VERSION, load_scorer
    from stepprobe.training import train

    out = train.run(train.Config(data=str(agreement_h5), sites="layer_01.group", out=str(tmp_path / "t"),
                                 max_epochs=3, plots=False, progress=False))
    scorer = load_scorer(out / "scorer")
    assert scorer.meta["schema_version"] == GROUP_SCHEMA_VERSION and scorer.state_size == HIDDEN
    assert scorer.group["features"] == {"layer_01.group": {"site": "layer_01", "kind": ".group", "alignment": "time"}}
    hs = HiddenStates(agreement_h5)
    read = lambda s: np.asarray(hs.features(s), dtype=np.float32)  # noqa: E731
    mean, std = scorer.group_stats()["layer_01"]
    want = G.standardize_stats(read("layer_01"))
    np.testing.assert_array_equal(mean, want[0])
    np.testing.assert_array_equal(std, want[1])
    feats = G.compute_feature(hs, "layer_01.group", read, stats=(mean, std))
    scores = scorer.module(torch.as_tensor(feats)[:, None]).detach().numpy()
    assert ((scores > 0.5) == (np.asarray(hs.steps["label"]) == 1)).mean() > 0.8  # the signal, offline
    scorer.check_live()
    scorer.check_group_size(2)
    with pytest.raises(ArtifactMismatch, match="n=1 gives none"):
        scorer.check_group_size(1)
    for name, why in (("layer_01.group_step", "aligned by step"), ("text.group", "decoded text")):
        s = train.run(train.Config(data=str(agreement_h5), sites=name, out=str(tmp_path / name), max_epochs=1,
                                   plots=False, progress=False))
        with pytest.raises(ArtifactMismatch, match=why):
            load_scorer(s / "scorer").check_live()


def test_group_scorer_checkpoints_are_checked_and_old_readers_refuse_them(tmp_path):
    import json

    from stepprobe.errors import ArtifactMismatch, StepprobeError
    from stepprobe.probes.checkpoint import CONFIG_FILE, SCORER_KIND, load_scorer, save_scorer
    from stepprobe.probes.features import FeatureSpec, ProbeModel
    from stepprobe.provenance import check_schema

    probe = ProbeModel(FeatureSpec(("layer_01.gdev",)), "linear", HIDDEN)
    with pytest.raises(StepprobeError, match=r"group features \(layer_01.gdev\) but carries no group block"):
        save_scorer(tmp_path / "s", probe, model=IDENTITY, boundary_rule=RULE)
    stats = {"mean": [0.0] * HIDDEN, "std": [1.0] * HIDDEN}
    group = {"features": {"layer_01.gdev": {"site": "layer_01", "kind": ".gdev", "alignment": "time"}},
             "stats": {"layer_01": stats}}
    path = save_scorer(tmp_path / "s", probe, model=IDENTITY, boundary_rule=RULE, group=group)
    meta = json.loads((path / CONFIG_FILE).read_text())
    with pytest.raises(ArtifactMismatch, match="schema version 2, this stepprobe reads version 1"):
        check_schema(meta, SCORER_KIND, 1, "scorer.json")  # what a reader from before group scorers does
    plain = save_scorer(tmp_path / "plain", ProbeModel(FeatureSpec(("layer_01",)), "linear", HIDDEN), model=IDENTITY,
                        boundary_rule=RULE)
    assert json.loads((plain / CONFIG_FILE).read_text())["schema_version"] == 1  # old readers still load these
    load_scorer(plain)
    for broken, match in ((lambda m: m.pop("group"), "needs its 'group' block"),
                          (lambda m: m["group"]["stats"].pop("layer_01"), "no standardization"),
                          (lambda m: m["group"]["features"]["layer_01.gdev"].update(alignment="step"), "misdescribes"),
                          (lambda m: m.update(schema_version=1), "carries no group block")):
        m = json.loads(json.dumps(meta))
        broken(m)
        if m["schema_version"] == 1:
            m.pop("group")
        (path / CONFIG_FILE).write_text(json.dumps(m))
        with pytest.raises(ArtifactMismatch, match=match):
            load_scorer(path)
    with pytest.raises(StepprobeError, match="has a group block but reads no group feature"):
        save_scorer(tmp_path / "p2", ProbeModel(FeatureSpec(("layer_01",)), "linear", HIDDEN), model=IDENTITY,
                    boundary_rule=RULE, group=group)


def test_group_eval_ranks_and_replays_a_set(agreement_h5):
    """The measurement's pieces on the synthetic file: the text agreement ranks right, a random
    score does not, the replay's records carry every trace (SC accuracy = majority of the file)."""
    from stepprobe.training import group_eval as E

    rng = np.random.default_rng(0)
    fns = {"text": lambda hs, tr, memo, vn: G.text_agreement(G.step_texts(hs, tr), *vn),
           "random": lambda hs, tr, memo, vn: rng.random(hs.num_steps)}
    res = E.evaluate_set("synthetic", str(agreement_h5), str(agreement_h5.parent / "traces.jsonl"), fns, {"q0", "q1"})
    assert res["problems"] == 158
    text, rand = res["variants"]["text"], res["variants"]["random"]
    assert text["ranking"]["rank50"]["value"] > 0.9 and text["ranking"]["rank50"]["problems"] == 158
    assert rand["ranking"]["rank50"]["lo"] < 0.5 < rand["ranking"]["rank50"]["hi"]
    majority = []
    for line in (agreement_h5.parent / "traces.jsonl").read_text().splitlines()[1:]:
        rec = json.loads(line)
        if rec["problem_id"] in ("p000", "p001"):
            continue
        answers = [t["extracted_answer"] for t in rec["traces"]]
        top = max(answers, key=lambda a: (answers.count(a), -answers.index(a)))
        majority.append(next(t["correct"] for t in rec["traces"] if t["extracted_answer"] == top))
    assert text["replay16"]["sc_accuracy"] == pytest.approx(np.mean(majority))


def test_tune_searches_group_features_and_export_writes_the_group_scorer(tmp_path, agreement_h5):
    """`stepprobe tune --sites 1-2.group` (issue 23): accepted (the base sites are in the file), its
    trials train on the group features, and `stepprobe export` writes the best as a live group scorer;
    a site whose base is not recorded, and a window over features of different widths, are refused."""
    from stepprobe.errors import StepprobeError
    from stepprobe.layers import parse_sites
    from stepprobe.probes.checkpoint import GROUP_SCHEMA_VERSION, load_scorer
    from stepprobe.training import export, tune

    assert parse_sites("1-2.group,layer_03.gdev,text.group", NUM_LAYERS) == [
        "layer_01.group", "layer_02.group", "layer_03.gdev", "text.group"]
    cfg = tune.Config(data=str(agreement_h5), out=str(tmp_path / "tune"), sites="1-2.group", n_trials=2, max_epochs=2,
                      patience=1, archs="linear", cv_folds=1, progress=False, plots=False)
    tune.run(cfg)
    exp = export.run(export.Config(source=str(tmp_path / "tune"), out=str(tmp_path / "scorer"), plots=False))
    scorer = load_scorer(exp)
    assert scorer.sites[0] in ("layer_01.group", "layer_02.group")
    assert scorer.meta["schema_version"] == GROUP_SCHEMA_VERSION and scorer.state_size == HIDDEN
    scorer.check_live()
    with pytest.raises(StepprobeError, match="would join group scalars"):
        tune.run(cfg.replace(out=str(tmp_path / "t2"), sites="layer_01,layer_01.group", combines="single,mean"))
    other = tmp_path / "other" / "states.h5"
    other.parent.mkdir()
    import shutil

    shutil.copy(agreement_h5, other)  # no traces file beside it: text.group cannot be computed
    with pytest.raises(StepprobeError, match="has no features for text.group"):
        tune.run(cfg.replace(data=str(other), out=str(tmp_path / "t3"), sites="layer_01.group,text.group"))
    assert not (tmp_path / "t2").exists() and not (tmp_path / "t3").exists()


def test_evaluate_standardizes_a_group_scorers_features_as_its_training_did(tmp_path, agreement_h5):
    """`stepprobe evaluate` (`score_steps`) of a group scorer on another file computes the group features with the
    scorer's standardization (what the live runner uses), not the evaluated file's own."""
    import h5py
    import torch

    from stepprobe.data_collection.hdf5 import HiddenStates
    from stepprobe.probes.checkpoint import load_scorer
    from stepprobe.training import evaluate, train

    out = train.run(train.Config(data=str(agreement_h5), sites="layer_01.gdev", out=str(tmp_path / "t"), max_epochs=2,
                                 plots=False, progress=False))
    scorer = load_scorer(out / "scorer")
    other = make_agreement(tmp_path / "o" / "states.h5", n_problems=40, seed=3)
    with h5py.File(other, "r+") as f:  # another scale and offset than the training file's
        for name in f["features"]:
            f["features"][name][...] = f["features"][name][...] * 3.0 + 2.0
    hs = HiddenStates(other)
    read = lambda s: np.asarray(hs.features(s), dtype=np.float32)  # noqa: E731
    want = G.compute_feature(hs, "layer_01.gdev", read, stats=scorer.group_stats()["layer_01"])
    own = G.compute_feature(hs, "layer_01.gdev", read)
    assert not np.allclose(want, own, atol=1e-3)
    got = evaluate.score_steps(scorer, hs)
    np.testing.assert_allclose(got, scorer.module(torch.as_tensor(want)[:, None]).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
