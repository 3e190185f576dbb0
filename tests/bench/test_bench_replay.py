"""Smoke test of `ringtail bench --diff` (bench/replay.py): NOT a performance test.

Runs the "micro" profile and checks that every measure is produced and that
the two runs it builds (the same work, shuffled inside epochs) diff as
identical from every file kind (the bench asserts that itself).
"""

from __future__ import annotations

from ringtail.bench import replay


def test_micro_profile_runs_and_renders(tmp_path):
    results = replay.run("micro", str(tmp_path), progress=lambda line: None)
    assert results["records_per_side"] == 20_000
    assert set(results["files"]) == {"ring", "vrrl", "snapshot"}
    assert results["snapshot"]["ratio"] > 1
    section = replay.render_section(results, ["ringtail", "bench", "--diff"])
    assert section.startswith(replay.DOC_SECTION_TITLE) and "diff of two ring files" in section
