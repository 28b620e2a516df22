"""The per-rule conda environments pin exactly what pyproject.toml pins (conda cannot run in CI)."""

from __future__ import annotations

import re
import tomllib

import yaml

OWN = "-e ${COVIDCT_SOURCE}"     # expanded by pip, from any folder conda copies the file to


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
    assert {e.stem for e in envs} >= {"preprocess", "deep", "gpu", "stats"}
    requires = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["requires-python"]
    low = re.search(r">=\s*(\d+\.\d+)", requires).group(1)
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        conda = [d for d in spec["dependencies"] if isinstance(d, str)]
        python = [d for d in conda if d.startswith("python=")]
        assert python == [f"python={low}"], (
            f"{env.name}: python pin {python} vs requires-python {requires}"
        )
        pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
        own = [p for p in pip if p.startswith("-e ")]
        assert len(own) == 1 and own[0].startswith(OWN), \
            f"{env.name} must install covidct from the workflow's checkout ({OWN})"
        for req in pip:
            if req.startswith("-"):
                continue
            assert "==" in req, f"{env.name}: {req} is not pinned"
            name, version = _name(req), req.split("==")[1]
            assert name in pins, f"{env.name}: {name} is not a dependency in pyproject.toml"
            assert version == pins[name], (
                f"{env.name}: {name}=={version}, pyproject has {pins[name]}"
            )


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
    """Each rule block names a log and (unless it is a `run:` rule) an existing conda env."""
    rules = 0
    for smk in sorted((repo / "workflow" / "rules").glob("*.smk")):
        blocks = re.split(r"^\s*rule(?: \w+)?:\s*$", smk.read_text(), flags=re.M)[1:]
        for block in blocks:
            # a block ends where the next top-level statement starts
            body = re.split(r"^\S", block, maxsplit=1, flags=re.M)[0]
            rules += 1
            name = re.search(r"name:\s*\n\s*(.+)", body)
            label = f"{smk.name}: rule {name.group(1) if name else body.split(chr(10))[1].strip()}"
            assert re.search(r"^\s+log:", body, flags=re.M), f"{label} has no log"
            if re.search(r"^\s+run:", body, flags=re.M):
                continue
            envs = re.findall(r'"\.\./\.\./envs/(\w+)\.yaml"', body)
            assert envs or "segment_env()" in body or "deep_env()" in body, \
                f"{label} has no conda env"
            for env in envs:
                assert (repo / "envs" / f"{env}.yaml").exists(), f"{label}: envs/{env}.yaml missing"
    assert rules >= 16
