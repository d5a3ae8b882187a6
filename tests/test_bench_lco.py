"""bench_lco's closing summary reads the run's own figures: rejection first against rejection per
request (a lower bound where rejection found no hit) and the archive's default engine against today's."""

from __future__ import annotations

from benchmarks.bench_lco import side_by_side


def test_side_by_side_states_each_ratio_from_the_figures(capsys):
    figures = {
        "cost Infiltration (most common) rejection FPE/satisfied": 64.0,
        "cost Infiltration (most common) rejection s/satisfied": 0.5,
        "cost Infiltration (most common) rejection FPE": 1024.0,
        "cost Infiltration (most common) rejection s": 8.0,
        "cost Infiltration (most common) rej-first+LCO FPE/satisfied": 48.0,
        "cost Infiltration (most common) rej-first+LCO s/satisfied": 0.6,
        "cost Hernia (rarest) rejection FPE/satisfied": float("inf"),
        "cost Hernia (rarest) rejection s/satisfied": float("inf"),
        "cost Hernia (rarest) rejection FPE": 25_000.0,
        "cost Hernia (rarest) rejection s": 180.0,
        "cost Hernia (rarest) rej-first+LCO FPE/satisfied": 1000.0,
        "cost Hernia (rarest) rej-first+LCO s/satisfied": 6.0,
        "archive nih today's img/s": 0.05,
        "archive nih rejection first img/s": 0.3,
        "archive nih the default img/s": 0.4,
    }
    side_by_side(figures)
    out = capsys.readouterr().out
    assert "Infiltration (most common): rejection first + LCO costs 0.75x rejection's passes, 1.20x its seconds" in out
    assert "Hernia (rarest): rejection first + LCO costs > 25.0x cheaper in passes, > 30.0x in seconds" in out
    assert "the default engine makes 8.00x the images/s of today's" in out


def test_side_by_side_is_silent_without_cost_or_archive(capsys):
    side_by_side({"lco_step_forward_passes": 6.1})
    assert capsys.readouterr().out == ""
