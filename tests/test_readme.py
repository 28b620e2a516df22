"""README's set-up / run / test commands are the ones CI runs (.ci/run extracts them)."""

from __future__ import annotations

import subprocess


def _block(repo, tag: str) -> str:
    out = subprocess.run(
        [
            "awk",
            "-v",
            f"tag=<!-- ci:{tag} -->",
            "$0 == tag { found = 1; next } "
            "found && /^```/ { if (inblock) exit; inblock = 1; next } inblock { print }",
            str(repo / "README.md"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_readme_commands(repo):
    setup, run, test = (_block(repo, t) for t in ("setup", "run", "test"))
    assert setup.startswith("python3 -m venv .venv") and 'pip install -e ".[all,test]"' in setup
    assert run == ".venv/bin/snakemake --cores all"
    assert test.startswith(".venv/bin/pytest")
    ci = (repo / ".ci" / "run").read_text()
    assert "readme_block setup" in ci and "readme_block test" in ci
