"""The config base and the CLI: files, flags, overrides and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from stepprobe import cli
from stepprobe.config import StageConfig, option
from stepprobe.errors import StepprobeError


@dataclasses.dataclass
class DemoConfig(StageConfig):
    SECTION = "demo"
    name: str = option("x", "a name")
    n: int = option(4, "a count")
    rate: float = option(0.5, "a rate")
    flag: bool = option(False, "a switch")
    limit: int | None = option(None, "optional")
    sites: list[str] = option(help="sites", factory=list)


def test_from_dict_coerces_types():
    c = DemoConfig.from_dict({"n": "7", "rate": "0.25", "flag": "yes", "limit": "none", "sites": "a,b"})
    assert (c.n, c.rate, c.flag, c.limit, c.sites) == (7, 0.25, True, None, ["a", "b"])


def test_unknown_field_is_one_line_error():
    with pytest.raises(StepprobeError, match="unknown field.*nope"):
        DemoConfig.from_dict({"nope": 1})


def test_bad_value_names_the_field():
    with pytest.raises(StepprobeError, match="'n'"):
        DemoConfig.from_dict({"n": "many"})


def test_file_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("demo:\n  n: 3\n  name: from-file\nother:\n  ignored: 1\n")
    c = DemoConfig.from_file(path, n=9)
    assert (c.name, c.n) == ("from-file", 9)
    assert c.to_dict()["stepprobe_version"]
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"rate": 1.5}))
    assert DemoConfig.from_file(js).rate == 1.5


def test_bad_file_errors(tmp_path):
    with pytest.raises(StepprobeError, match="not found"):
        DemoConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(StepprobeError, match="mapping"):
        DemoConfig.from_file(bad)


def test_flags_built_from_fields():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    cli.add_config_flags(parser, DemoConfig)
    args = parser.parse_args(["--n", "5", "--flag", "--sites", "layer_01,layer_02"])
    c = cli.build_config(DemoConfig, args)
    assert (c.n, c.flag, c.sites, c.name) == (5, True, ["layer_01", "layer_02"], "x")


def test_cli_help_lists_stages_and_model_stage_runs():
    out = subprocess.run([sys.executable, "-m", "stepprobe.cli", "--help"], capture_output=True, text=True, check=True)
    assert "model" in out.stdout and "stages" in out.stdout
    for name in cli.available_stages():
        assert name in out.stdout


def test_cli_error_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stepprobe.cli", "model", "--config", str(tmp_path / "nope.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "config file not found" in out.stderr


def test_every_stage_names_its_output_output_and_still_takes_out(tmp_path, capsys):
    """Issue 24: one name for the output path across stages (--output, `output:`); the
    other spelling (--out, `out:`, the training stages' and the pipeline's field) still works."""
    import importlib

    from stepprobe.cli import STAGES, _parse_stage
    from stepprobe.config import OUTPUT_NAMES

    checked = []
    for stage, (module_name, _) in STAGES.items():
        cls = importlib.import_module(module_name).Config
        field = next((f.name for f in cls.fields() if f.name in OUTPUT_NAMES), None)
        if field is None:
            continue
        for flag in ("--output", "--out"):
            _, args = _parse_stage(stage, [flag, "x/y"])
            assert getattr(args, field) == "x/y", (stage, flag)
        with pytest.raises(SystemExit):
            _parse_stage(stage, ["--help"])
        shown = capsys.readouterr().out
        assert "--output OUTPUT" in shown and "--out " not in shown, stage
        checked.append(stage)
    assert {"collect", "record", "run", "bench", "replay", "train", "sweep", "tune", "export", "evaluate",
            "pipeline"} <= set(checked)

    from stepprobe.pipeline import Config

    for key in OUTPUT_NAMES:
        path = tmp_path / f"{key}.yaml"
        path.write_text(f"pipeline:\n  {key}: runs/p\n")
        assert Config.from_file(path).out == "runs/p"
        assert Config.from_file(path, out="runs/q").out == "runs/q"  # a flag overrides the file
    with pytest.raises(StepprobeError, match="output is given twice"):
        Config.from_dict({"out": "a", "output": "b"})


def test_sigterm_that_c_code_turned_into_another_exception_is_still_one_line(monkeypatch, capsys):
    """Raised from the handler inside an extension module's import, the Terminated came out as
    "TypeError: expected a message argument" (ssl, 2026-12-05 suite): still one line, exit 143."""
    import importlib
    import os
    import signal
    import time

    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("the test process handles SIGTERM itself")
    module = importlib.import_module(cli.STAGES["model"][0])

    def run(config):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        except BaseException:  # what the C code did with the handler's exception
            raise TypeError("expected a message argument") from None

    monkeypatch.setattr(module, "run", run)
    assert cli.main(["model"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stepprobe model: terminated (SIGTERM)" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
