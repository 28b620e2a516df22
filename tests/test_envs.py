"""The per-rule conda environments pin exactly what pyproject.toml pins (conda cannot run in CI)."""

from __future__ import annotations

import re
import tomllib

import yaml


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[=<>;\[ ]", req, maxsplit=1)[0]).lower()


def _pyproject_pins(repo) -> dict[str, str]:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += [r for r in extra if not r.startswith("covidct")]
    pins = {}
    for req in reqs:
        spec = req.split(";")[0].strip()
        assert "==" in spec, f"pyproject.toml: {req!r} is not pinned"
        pins[_name(spec)] = spec.split("==")[1]
    return pins


def test_every_env_pin_matches_pyproject(repo):
    pins = _pyproject_pins(repo)
    envs = sorted((repo / "envs").glob("*.yaml"))
    assert {e.stem for e in envs} >= {"preprocess", "deep", "stats"}
    requires = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.search(r">=\s*(\d+\.\d+)", requires).group(1)
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        conda = [d for d in spec["dependencies"] if isinstance(d, str)]
        python = [d for d in conda if d.startswith("python=")]
        assert python == [f"python={low}"], f"{env.name}: python pin {python} vs requires-python {requires}"
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        own = [p for p in pip if p.startswith("-e ..")]
        assert len(own) == 1, f"{env.name} must install covidct from the checkout"
        for req in pip:
            if req.startswith("-"):
                continue
            assert "==" in req, f"{env.name}: {req} is not pinned"
            name, version = _name(req), req.split("==")[1]
            assert name in pins, f"{env.name}: {name} is not a dependency in pyproject.toml"
            assert version == pins[name], f"{env.name}: {name}=={version}, pyproject has {pins[name]}"


def test_env_covers_the_extra_it_installs(repo):
    """An env installing covidct[extra] lists every pin of the core and of that extra."""
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    for env in sorted((repo / "envs").glob("*.yaml")):
        spec = yaml.safe_load(env.read_text())
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        listed = {_name(p) for p in pip if not p.startswith("-")}
        extra = re.search(r"\[(\w+)\]", next(p for p in pip if p.startswith("-e")))
        wanted = list(project["dependencies"])
        if extra:
            wanted += project["optional-dependencies"][extra.group(1)]
        wanted = {_name(r) for r in wanted if "platform_machine != " not in r}
        assert wanted <= listed, f"{env.name} lacks {sorted(wanted - listed)}"


def test_every_rule_has_an_env_and_a_log(repo):
    text = "\n".join(p.read_text() for p in (repo / "workflow" / "rules").glob("*.smk"))
    rules = re.findall(r"^\s*rule (\w+):", text, flags=re.M)
    assert len(rules) >= 10
    for env in re.findall(r'"\.\./\.\./envs/(\w+)\.yaml"', text):
        assert (repo / "envs" / f"{env}.yaml").exists()
