"""Smoke test of the end-to-end benchmark's plumbing (NOT a performance test).

Runs bench/e2e.py's "micro" profile (a few seconds, no Redis, no fio, asserts
no figure) so that a change to the daemon or the codec that breaks the bench
is caught by `make test`. Nothing in tests/ depends on the bench otherwise.
"""

from __future__ import annotations

from ringtail.bench import e2e


def test_micro_profile_runs_and_renders(tmp_path):
    results = e2e.run("micro", str(tmp_path))
    assert results["ingest"] and all(cell["records_per_s"] > 0 for cell in results["ingest"])
    assert results["replay"]["unfiltered"]["delivered"] == results["replay"]["records"]
    assert results["publisher"]["dropped_full"] == 0
    # Both clocks are reported. They are not compared: the thread CPU clock and
    # the wall clock have different granularity, and CI once read the caller's
    # CPU 1 ns over the wall time (303.2 vs 302.2 ns); a timed assertion anyway.
    assert results["publisher"]["caller_cpu_ns"] > 0 and results["publisher"]["amortised_ns"] > 0
    # The stall is measured unpaced (backpressure) and paced at half that rate.
    assert results["publisher"]["paced_worst_stall_ns"] > 0 < results["publisher"]["paced_rate"]
    assert results["replay"]["pipe"]["bytes"] == results["replay"]["records"] * e2e.RECORD_SIZE
    assert [cell["subscribers"] for cell in results["fanout"]] == [1, 2]
    assert all(cell["delivered"] > 0 for cell in results["fanout"])
    assert results["memory"]["start_after_kill_s"] > 0
    # Every target the micro profile can measure has a verdict under a stable key.
    assert {"ack_p50_of_plain", "tail_p99_margin_us_10k", "replay_of_pipe",
            "replay_filtered_of_pipe", "publish_ns", "scale_rss_mb"} <= set(results["targets"])
    assert all(results["targets"][key]["met"] is not None for key in
               ("ack_p50_of_plain", "replay_of_pipe", "publish_ns", "scale_rss_mb"))
    section = e2e.render_section(results, ["ringtail", "bench"])
    assert section.startswith(e2e.DOC_SECTION_TITLE) and "| target |" in section
