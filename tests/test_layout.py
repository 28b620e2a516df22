"""The package's layout: every module imports on its own, layers import only downwards (the
light-stage guarantee, `covidct ingest --help` without TensorFlow, is in test_ingest.py), and one
set of defaults serves the code, the command line and the config schema."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import shlex
import sys
import typing

import pytest
import yaml

import covidct
from covidct import params as P
from covidct.cli import STAGES

# bottom to top: a module may import its own layer and the layers below it
LAYERS = ["errors", "params", "io", "synth", "preprocess", "model", "analysis", "explain",
          "inference", "worker", "cli"]


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(covidct.__path__, "covidct.")]
    return [n for n in names if n != "covidct.__main__"]


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return LAYERS.index(part) if part in LAYERS else -1


def test_every_module_imports_on_its_own():
    """Each module imported first, with no other covidct module loaded: an import cycle or a
    missing import fails here (third-party libraries stay loaded, so this is quick)."""
    def ours():
        return [m for m in sys.modules if m == "covidct" or m.startswith("covidct.")]

    loaded = {name: sys.modules[name] for name in ours()}
    failed = []
    try:
        for module in _modules():
            for name in ours():
                del sys.modules[name]
            try:
                importlib.import_module(module)
            except Exception as err:        # report every module that fails, not the first
                failed.append(f"{module}: {type(err).__name__}: {err}")
    finally:                                # the other tests keep the modules they imported
        for name in ours():
            del sys.modules[name]
        sys.modules.update(loaded)
    assert not failed, "\n".join(failed)


def test_imports_run_from_the_command_line_down_to_io():
    """No module imports a module of a higher layer (at any depth of the file): no cycle."""
    upward = []
    for name in _modules():
        spec = importlib.util.find_spec(name)
        tree = ast.parse(open(spec.origin).read())
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target.startswith("covidct.") and _layer(target) > _layer(name) >= 0:
                    upward.append(f"{name} imports {target}")
    assert not upward, "\n".join(sorted(set(upward)))


def test_every_stage_module_exists():
    for stage, (module, _) in STAGES.items():
        mod = importlib.import_module(module)
        attr = stage.replace("-", "_")
        assert hasattr(mod, f"run_{attr}") or hasattr(mod, "run"), stage


# --------------------------------------------------------------------------- one set of defaults

def _schema_section(schema: dict, dotted: str) -> dict:
    node = schema
    for key in dotted.split("."):
        node = node["properties"][key]
    return node["properties"]


@pytest.mark.parametrize("section, cls", list(P.STAGE_PARAMS.items()))
def test_schema_defaults_are_the_dataclass_defaults(repo, section, cls):
    schema = yaml.safe_load((repo / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = _schema_section(schema, section)
    for f in dataclasses.fields(cls):
        assert f.name in props, f"{section}.{f.name} is missing from the config schema"
        entry = props[f.name]
        if section == "training" and f.name == "epochs":      # per rule in the config
            defaults = {k: v["default"] for k, v in entry["properties"].items()}
            assert set(defaults.values()) == {f.default}, defaults
            continue
        expected = list(f.default) if isinstance(f.default, tuple) else f.default
        assert entry.get("default") == expected, (
            f"{section}.{f.name}: schema {entry.get('default')!r}, code {expected!r}")


def test_one_threshold_everywhere(repo):
    """The evaluation threshold: one default for evaluate, predict and the schema (0.5; the
    authors' 0.8 is config/paper.yaml's)."""
    from covidct.inference.scan import predict_scan

    default = inspect_default(predict_scan, "threshold")
    assert default == P.EvaluationParams.threshold == 0.5
    paper = yaml.safe_load((repo / "config" / "paper.yaml").read_text())
    assert paper["evaluation"]["threshold"] == 0.8


def inspect_default(func, name):
    import inspect

    return inspect.signature(func).parameters[name].default


@pytest.mark.parametrize("cls", list(P.STAGE_PARAMS.values()))
def test_options_round_trip_through_the_command_line(cls):
    """The options the workflow writes for a config section parse back to the same values."""
    import argparse

    changed = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if hints[f.name] is bool:
            changed[f.name] = not f.default
        elif hints[f.name] is int and f.name not in ("epochs", "batch_size", "size"):
            changed[f.name] = f.default + 2
    params = dataclasses.replace(cls(), **changed)
    parser = argparse.ArgumentParser()
    P.add_options(parser, cls)
    parsed = P.from_args(cls, parser.parse_args(shlex.split(P.as_options(params))))
    assert parsed == params
    assert P.from_args(cls, parser.parse_args([])) == cls()


def test_bad_values_are_refused_with_the_field_named():
    from covidct.errors import CovidctError

    with pytest.raises(CovidctError, match="validation fraction"):
        P.TrainParams(val_fraction=1.5)
    with pytest.raises(CovidctError, match="not a probability"):
        P.EvaluationParams(threshold=2.0)
    with pytest.raises(CovidctError, match="multiple of 32"):
        P.SegmenterTrainParams(size=100)
