"""The scorer checkpoint: what `stepprobe export` writes and the vLLM runner loads.

A scorer is a directory with two files:

- ``scorer.safetensors``: the :class:`~stepprobe.probes.features.ProbeModel` state dict
  (``norm.mean``/``norm.std`` = training-split statistics, ``probe.*`` = weights), float32;
- ``scorer.json``: ``kind = "stepprobe-scorer"``, ``schema_version``, ``architecture`` and
  its ``params``, ``feature_spec`` (sites + combine), ``hidden_size``, ``model`` (identity:
  name, config hash, vocabulary hash, hidden size, layers), ``boundary_rule`` (delimiter and
  boundary token ids as recorded), ``threshold`` (a calibrated probability), ``calibration``
  (``{method, a, b}``, also the ``output_calibration`` tensor), ``features`` (``{step_mean: bool}``:
  whether the probe reads step means, which live capture does not compute), ``metrics``,
  ``config`` (the training config), ``package_versions``, ``created``, and ``weights_sha256``.

A scorer written before calibration existed has no ``output_calibration`` tensor; it loads with
the identity calibration ``(1, 0)``.

**Group scorers** (schema version 2, issue 23): a probe on group features (``<site>.group``,
``<site>.gdev``, ``<site>.group_step``, ``text.group``; :mod:`stepprobe.probes.group_features`)
also needs what its features were computed with, in ``group``: ``features`` (per feature: its
base ``site``, ``kind`` and sibling ``alignment``) and ``stats`` (per base site: the per-dimension
``mean`` and ``std`` of the training file's states, float64 as JSON numbers). Only such a scorer
is written as version 2, so a reader from before group scorers still loads every other scorer
and refuses a group scorer in one line (schema version); this reader reads both.
``hidden_size`` is then the probe's input width (6 group scalars, or the hidden size for
``.gdev``); the model's hidden size is ``model.hidden_size``.

:func:`load_scorer` never unpickles: it reads JSON, rebuilds the module from the probe
registry, loads the tensors with safetensors and checks every name, shape and dtype, and
the weights' hash. ``Scorer.module(x)`` maps ``float32 [n, len(sites), hidden]`` raw hidden
states to the probability that the trace ends correct (normalization and sigmoid included).

Planting a scorer with known behaviour (for tests)::

    probe = linear_probe(["layer_01"], weight=w, bias=b)       # score = sigmoid(w . x + b)
    save_scorer(dir, probe, model=identity, boundary_rule=rule)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stepprobe.errors import ArtifactMismatch, StepprobeError
from stepprobe.io import atomic_write_json, sha256_file
from stepprobe.layers import TEXT_GROUP, site_depth, split_group
from stepprobe.provenance import check_model_identity, check_schema, package_versions

from .features import FeatureSpec, ProbeModel

SCORER_KIND = "stepprobe-scorer"
SCORER_SCHEMA_VERSION = 1
GROUP_SCHEMA_VERSION = 2  # a scorer on group features (the ``group`` block)
WEIGHTS_FILE = "scorer.safetensors"
CONFIG_FILE = "scorer.json"
CARD_FILE = "README.md"  # the model card, where one is written
_REQUIRED = ("architecture", "params", "feature_spec", "hidden_size", "model", "boundary_rule", "weights_sha256")



class Scorer:
    """A loaded, validated scorer. Use :func:`load_scorer` to get one."""

    def __init__(self, module: ProbeModel, meta: dict[str, Any], path: Path | None = None):
        self.module = module.eval()
        self.meta = meta
        self.path = path

    @property
    def sites(self) -> list[str]:
        return list(self.module.spec.sites)

    @property
    def feature_spec(self) -> FeatureSpec:
        return self.module.spec

    @property
    def architecture(self) -> str:
        return self.module.arch

    @property
    def hidden_size(self) -> int:
        return self.module.hidden_size

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.meta["model"])

    @property
    def boundary_rule(self) -> dict[str, Any]:
        return dict(self.meta["boundary_rule"])

    @property
    def generation(self) -> dict[str, Any]:
        """The prompt and sampling settings of the data the probe was trained on ({} if unknown)."""
        return dict(self.meta.get("generation") or {})

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta.get("config") or {})

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.meta.get("metrics") or {})

    @property
    def threshold(self) -> float:
        return float(self.meta.get("threshold", 0.5))

    @property
    def calibration(self) -> dict[str, Any]:
        a, b = (float(v) for v in self.module.output_calibration.tolist())
        return {"method": (self.meta.get("calibration") or {}).get("method", "none"), "a": a, "b": b}

    @property
    def group(self) -> dict[str, Any] | None:
        """The ``group`` block of a group scorer (features and standardization), else None."""
        return self.meta.get("group")

    def group_stats(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per base site of a group scorer: the (mean, std) its features are standardized with."""
        return {site: (np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64))
                for site, d in ((self.group or {}).get("stats") or {}).items()}

    @property
    def state_size(self) -> int:
        """The hidden size of the states the runner captures (a group probe's own input is narrower)."""
        stats = (self.group or {}).get("stats") or {}
        for d in stats.values():
            return len(d["mean"])
        if self.group and self.model.get("hidden_size") is not None:  # text.group alone reads no state
            return int(self.model["hidden_size"])
        return self.hidden_size

    @property
    def uses_step_mean(self) -> bool:
        """The probe reads a step-mean feature (``<site>.mean``), which live capture does not compute."""
        return self.module.uses_step_mean

    def check_live(self) -> None:
        """Refuse (one line) a scorer that the vLLM runner's live capture cannot feed."""
        if self.uses_step_mean:
            means = [s for s in self.sites if s.endswith(".mean")]
            raise ArtifactMismatch(f"scorer {self.path or ''} reads step-mean features ({', '.join(means)}), which the "
                                   "live runner does not capture (it reads the boundary token only); use a scorer "
                                   "trained on boundary features")
        feats = (self.group or {}).get("features") or {}
        text = [n for n in feats if n == TEXT_GROUP]
        if text:
            raise ArtifactMismatch(f"scorer {self.path or ''} reads {', '.join(text)} (the numbers in the siblings' "
                                   "decoded text), which the worker does not have live; use a scorer on a site's "
                                   ".group or .gdev features")
        step = [n for n, f in feats.items() if f["alignment"] != "time"]
        if step:
            raise ArtifactMismatch(f"scorer {self.path or ''} reads {', '.join(step)} (siblings aligned by step index: "
                                   "a sibling's step k may come later than this trace's), which cannot be scored "
                                   "live; use the time-aligned <site>.group or <site>.gdev")

    def check_group_size(self, traces_per_problem: int) -> None:
        """Refuse (one line) a group scorer for problems of fewer than two traces (no siblings)."""
        if self.group and traces_per_problem < 2:
            raise ArtifactMismatch(f"scorer {self.path or ''} reads group features ({', '.join(self.group['features'])}), "
                                   f"which compare a trace with its siblings; n={traces_per_problem} gives none "
                                   "(use n >= 2 traces per problem)")

    @torch.no_grad()
    def score(self, features: Mapping[str, torch.Tensor | np.ndarray]) -> torch.Tensor:
        """Probability of a correct trace for each row, from ``{site: [n, hidden]}``."""
        missing = [s for s in self.sites if s not in features]
        if missing:
            raise StepprobeError(f"scorer reads sites {self.sites}; missing {missing}")
        x = torch.stack([torch.as_tensor(features[s]).float() for s in self.sites], dim=1)
        return self.module(x)

    def check_compatible(self, model_identity: Mapping[str, Any]) -> None:
        """Refuse (``ArtifactMismatch``, one line) a model whose features this probe cannot read."""
        what = f"scorer {self.path}" if self.path else "scorer"
        hs = model_identity.get("hidden_size")
        if hs is not None and int(hs) != self.state_size:
            raise ArtifactMismatch(f"{what} reads hidden size {self.state_size}, but model "
                                   f"{model_identity.get('name')!r} has hidden size {hs}")
        n = model_identity.get("num_hidden_layers")
        if n is not None:
            for s in self.sites:
                try:
                    site_depth(s, int(n))
                except StepprobeError:
                    raise ArtifactMismatch(f"{what} reads site {s!r}, which model {model_identity.get('name')!r} "
                                           f"({n} layers) does not have") from None
        check_model_identity(self.model, dict(model_identity), what)

    def __repr__(self) -> str:
        return (f"Scorer({self.architecture}, sites={self.sites}, hidden={self.hidden_size}, "
                f"model={self.model.get('name')!r})")


def linear_probe(sites: Sequence[str], weight: Any, bias: float = 0.0, *, combine: str | None = None,
                 mean: Any = None, std: Any = None) -> ProbeModel:
    """A linear probe with chosen weights: ``sigmoid(weight . combine((x - mean) / std) + bias)``.

    ``weight`` has the combined feature size (hidden, or hidden * sites for concat); mean and
    std default to 0 and 1 (no normalization). For planting scorers with known scores.
    """
    w = torch.as_tensor(np.asarray(weight, dtype=np.float32)).flatten()
    combine = combine or ("single" if len(sites) == 1 else "mean")
    hidden = w.numel() // len(sites) if combine == "concat" else w.numel()
    probe = ProbeModel(FeatureSpec(tuple(sites), combine), "linear", hidden)
    with torch.no_grad():
        probe.probe.head.weight.copy_(w[None])
        probe.probe.head.bias.fill_(float(bias))
        if mean is not None:
            probe.norm.mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float32)).expand_as(probe.norm.mean))
        if std is not None:
            probe.norm.std.copy_(torch.as_tensor(np.asarray(std, dtype=np.float32)).expand_as(probe.norm.std))
    return probe


def save_scorer(directory: str | os.PathLike, probe: ProbeModel, *, model: Mapping[str, Any],
                boundary_rule: Mapping[str, Any], metrics: Mapping[str, Any] | None = None,
                config: Mapping[str, Any] | None = None, threshold: float = 0.5,
                provenance: Mapping[str, Any] | None = None, generation: Mapping[str, Any] | None = None,
                overwrite: bool = False, calibration: Mapping[str, Any] | None = None,
                card: str | None = None, group: Mapping[str, Any] | None = None) -> Path:
    """Write ``probe`` as a scorer directory; returns its path.

    ``generation``: the prompt and sampling settings of the data the probe was trained on
    (``stepprobe.options.generation_of``); ``run``, ``bench`` and ``serve`` default to them.

    ``model`` is the model identity the features came from (``stepprobe.provenance.model_identity``
    or ``HiddenStates.model``); its ``hidden_size``, if given, must equal the probe's.
    Refuses a directory that already holds a scorer unless ``overwrite``. ``group``: for a probe on
    group features, what they were computed with (:func:`stepprobe.probes.group_features.checkpoint_info`).
    """
    directory = Path(directory)
    if (directory / CONFIG_FILE).exists() and not overwrite:
        raise StepprobeError(f"{directory} already holds a scorer; pass overwrite to replace it")
    if not isinstance(probe, ProbeModel):
        raise StepprobeError(f"save_scorer needs a ProbeModel, got {type(probe).__name__}")
    group = _jsonable(dict(group)) if group else None
    _check_group(probe.spec.sites, group, "the probe")
    state = probe.hidden_size if not group else len(next(iter(group["stats"].values()))["mean"]) if group["stats"] else None
    if model.get("hidden_size") is not None and state is not None and int(model["hidden_size"]) != state:
        raise ArtifactMismatch(f"probe reads hidden size {state}, model identity says {model['hidden_size']}")
    if "delimiter" not in boundary_rule:
        raise StepprobeError("boundary_rule must at least name its delimiter")
    version = GROUP_SCHEMA_VERSION if group else SCORER_SCHEMA_VERSION
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in probe.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"kind": SCORER_KIND, "schema_version": str(version)})
        digest = sha256_file(Path(tmp))
        os.replace(tmp, directory / WEIGHTS_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {
        "kind": SCORER_KIND,
        "schema_version": version,
        **probe.describe(),
        "model": dict(model),
        "boundary_rule": dict(boundary_rule),
        "threshold": float(threshold),
        "calibration": {**_jsonable(calibration or {}), "method": (calibration or {}).get("method", "none"),
                        "a": float(probe.output_calibration[0]), "b": float(probe.output_calibration[1])},
        "features": {"step_mean": probe.uses_step_mean},
        **({"group": group} if group else {}),
        "metrics": _jsonable(metrics or {}),
        "config": _jsonable(config or {}),
        "provenance": _jsonable(provenance or {}),
        "generation": _jsonable(generation or {}),
        "package_versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": digest,
    }
    atomic_write_json(directory / CONFIG_FILE, meta)
    if card is not None:
        (directory / CARD_FILE).write_text(card, encoding="utf-8")
    return directory


def read_scorer_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated JSON half of a scorer (no tensors loaded)."""
    directory = Path(directory)
    cfg = directory / CONFIG_FILE
    if not directory.is_dir():
        raise StepprobeError(f"scorer directory not found: {directory}")
    if not cfg.is_file():
        raise ArtifactMismatch(f"{directory} is not a scorer checkpoint (no {CONFIG_FILE})")
    try:
        meta = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ArtifactMismatch(f"{cfg}: not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise ArtifactMismatch(f"{cfg}: expected a JSON object")
    version = GROUP_SCHEMA_VERSION if meta.get("schema_version") == GROUP_SCHEMA_VERSION else SCORER_SCHEMA_VERSION
    check_schema(meta, SCORER_KIND, version, str(cfg))
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ArtifactMismatch(f"{cfg}: missing field(s) {', '.join(missing)}")
    if version == GROUP_SCHEMA_VERSION and not isinstance(meta.get("group"), dict):
        raise ArtifactMismatch(f"{cfg}: a version-{version} scorer needs its 'group' block")
    sites = meta["feature_spec"].get("sites") if isinstance(meta["feature_spec"], dict) else None
    _check_group(list(sites or ()), meta.get("group"), str(cfg), ArtifactMismatch)
    mh = meta["model"].get("hidden_size")
    if mh is not None and not meta.get("group") and int(mh) != int(meta["hidden_size"]):
        raise ArtifactMismatch(f"{cfg}: probe hidden size {meta['hidden_size']} differs from its model's {mh}")
    return meta


def load_scorer(directory: str | os.PathLike, *, expected_model: Mapping[str, Any] | None = None) -> Scorer:
    """Load and validate a scorer directory (JSON + safetensors; nothing is unpickled).

    With ``expected_model`` (a model identity), also :meth:`Scorer.check_compatible`.
    """
    directory = Path(directory)
    meta = read_scorer_meta(directory)
    weights = directory / meta.get("weights_file", WEIGHTS_FILE)
    if not weights.is_file():
        raise ArtifactMismatch(f"{directory}: weights file {weights.name} is missing")
    if sha256_file(weights) != meta["weights_sha256"]:
        raise ArtifactMismatch(f"{weights}: contents do not match the hash in {CONFIG_FILE} (mixed or corrupt checkpoint)")
    spec = FeatureSpec.from_dict(meta["feature_spec"])
    n_layers = meta["model"].get("num_hidden_layers")
    if n_layers is not None:
        for s in spec.sites:
            site_depth(s, int(n_layers))
    probe = ProbeModel(spec, meta["architecture"], int(meta["hidden_size"]), meta.get("params") or {})
    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactMismatch(f"{weights}: not a readable safetensors file ({exc})") from None
    expected = probe.state_dict()
    if "output_calibration" not in tensors and "calibration" not in meta:
        tensors["output_calibration"] = expected["output_calibration"].clone()  # written before calibration existed
    if set(tensors) != set(expected):
        extra, lacking = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
        raise ArtifactMismatch(f"{weights}: tensors do not match architecture {meta['architecture']!r} "
                               f"(unexpected {extra}, missing {lacking})")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ArtifactMismatch(f"{weights}: tensor {name} has shape {list(t.shape)}, "
                                   f"architecture wants {list(expected[name].shape)}")
        if t.dtype != torch.float32:
            raise ArtifactMismatch(f"{weights}: tensor {name} is {t.dtype}, expected float32")
        if not torch.isfinite(t).all():
            raise ArtifactMismatch(f"{weights}: tensor {name} holds NaN or inf")
    probe.load_state_dict(tensors, strict=True)
    scorer = Scorer(probe, meta, directory)
    if expected_model is not None:
        scorer.check_compatible(expected_model)
    return scorer


def _check_group(sites: Sequence[str], group: Mapping[str, Any] | None, what: str,
                 error: type[Exception] = StepprobeError) -> None:
    """A probe on group features needs its ``group`` block (each feature with its site, kind,
    alignment; each non-text site's mean and std of one length); a plain probe has none."""
    feats = [s for s in sites if split_group(s)[1] is not None]
    if not group:
        if feats:
            raise error(f"{what} reads group features ({', '.join(feats)}) but carries no group block (their "
                        "standardization and alignment): write it with `stepprobe train` or save_scorer(group=...)")
        return
    if not feats:
        raise error(f"{what} has a group block but reads no group feature ({', '.join(sites)})")
    known, stats = group.get("features") or {}, group.get("stats") or {}
    for name in feats:
        site, kind = split_group(name)
        f = known.get(name) or {}
        align = "step" if kind == ".group_step" else "time"  # group_features.alignment_of
        if (f.get("site"), f.get("kind"), f.get("alignment")) != (site, kind, align):
            raise error(f"{what}: group block lacks or misdescribes feature {name!r}")
        if name != TEXT_GROUP:
            st = stats.get(site) or {}
            if not st.get("mean") or len(st.get("mean") or ()) != len(st.get("std") or ()):
                raise error(f"{what}: group block has no standardization (mean, std of one length) for site {site!r}")
    sizes = {len(d["mean"]) for d in stats.values()}
    if len(sizes) > 1:
        raise error(f"{what}: group block's sites have different hidden sizes {sorted(sizes)}")


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so numpy scalars and paths become plain values."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
