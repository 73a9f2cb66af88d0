"""bench/capabilities.py (the family x capability table) stays alive: on one family every cell is ✓, a refusal shows
the InputError's own message, a crash shows as ✗, and the table covers every public probe and intervention."""

import importlib.util
from pathlib import Path

import pytest

from mech_vtokens.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cap():
    spec = importlib.util.spec_from_file_location("bench_capabilities", ROOT / "bench" / "capabilities.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_family_row_is_all_ticks(cap, tiny_dir):
    cells = cap.row("llava", tiny_dir("llava"))
    assert list(cells) == list(cap.columns())
    assert all(v == cap.OK for v in cells.values()), {k: v for k, v in cells.items() if v != cap.OK}
    md = cap.table({"llava": cells})
    head, rule, line = md.splitlines()
    assert head.split(" | ")[1:4] == ["sites", "probes (one forward)", "Prune"]
    assert line == "| llava | " + " | ".join([cap.OK] * len(cells)) + " |"


def test_a_refusal_shows_its_message_and_a_crash_shows_as_a_bug(cap, tiny_dir, monkeypatch):
    from mech_vtokens.interventions import Prune

    def refuse(self, vlm, batch):
        raise InputError("Prune: planted refusal | with a pipe and a message longer than the table keeps, so that "
                         "the cell is cut to the table's width")

    monkeypatch.setattr(Prune, "check", refuse)
    cols = cap.columns()
    cols = {c: cols[c] for c in ("Prune", "generate + Prune", "Rescale")}
    cells = cap.row("llava", tiny_dir("llava"), cols)
    for c in ("Prune", "generate + Prune"):
        assert cells[c].startswith("refused: Prune: planted refusal / with a pipe"), cells[c]  # no "|": one cell
        assert cells[c].endswith("…") and len(cells[c]) == len("refused: ") + cap.WIDTH
    assert cells["Rescale"] == cap.OK

    def crash(ctx):
        raise KeyError("boom")

    assert cap._cell(crash, {}) == "✗ KeyError: 'boom'"


def test_the_table_covers_every_probe_and_intervention(cap, tiny_vlm):
    import mech_vtokens.interventions as I
    import mech_vtokens.probes as P
    from mech_vtokens.component import Intervention, Probe

    probes = {type(p).__name__ for p in cap._probes(tiny_vlm("llava"))}
    assert probes == {n for n in P.__all__ if isinstance(getattr(P, n), type) and issubclass(getattr(P, n), Probe)}
    public = {n for n in I.__all__ if isinstance(getattr(I, n), type) and issubclass(getattr(I, n), Intervention)}
    assert public <= set(cap.columns())
