"""One import namespace: probes and interventions install as ``mech_vtokens.probes`` / ``mech_vtokens.interventions``;
the global names ``probes`` / ``interventions`` are not claimed, and the core never imports its plugins' folders by
those names (the core owns the component contract and the token sets; plugins depend on the core)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code, tmp_path):
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)


def test_plugins_live_under_the_package_namespace(tmp_path):
    ok = _run("import mech_vtokens.probes as p, mech_vtokens.interventions as i; "
              "from mech_vtokens.probes import EmbedLens; from mech_vtokens.interventions import Prune, applied; "
              "from mech_vtokens.token_sets import AllVisual; print(p.EmbedLens is EmbedLens)", tmp_path)
    assert ok.returncode == 0 and ok.stdout.strip() == "True", ok.stderr
    for name in ("probes", "interventions"):  # run outside the checkout: only the installed names are importable
        bad = _run(f"import {name}", tmp_path)
        assert bad.returncode != 0 and f"No module named '{name}'" in bad.stderr, (name, bad.stdout, bad.stderr)


def scan(root):
    """Files under ``root`` that import the top-level names ``probes`` / ``interventions``: {path: [line numbers]}."""
    pat = re.compile(r"^\s*(from|import)\s+(probes|interventions)\b")
    hits = {}
    for f in sorted(root.rglob("*.py")):
        lines = [i for i, line in enumerate(f.read_text().splitlines(), 1) if pat.match(line)]
        if lines:
            hits[str(f.relative_to(root))] = lines
    return hits


def test_nothing_imports_the_plugin_folders_by_their_global_names():
    found = {}
    for part in ("mech_vtokens", "probes", "interventions", "tests", "bench", "notebooks"):
        found.update({f"{part}/{k}": v for k, v in scan(ROOT / part).items()})
    assert found == {}


def test_scan_finds_a_planted_import(tmp_path):
    (tmp_path / "m.py").write_text("import torch\nfrom probes import EmbedLens\n  import interventions\n")
    assert scan(tmp_path) == {"m.py": [2, 3]}
