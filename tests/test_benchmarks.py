"""benchmarks/throughput.py says so when its peer cannot run: a missing TRL stops it before any run, and a
peer run that fails makes the benchmark exit non-zero. Decisions only: no model runs here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)


def run(tool: str, mode: str, code: int = 0, tps: float | None = 100.0) -> dict:
    return {
        "tool": tool,
        "mode": mode,
        "exit": code,
        "tokens_per_s": tps,
        "peak_rss_gb": 1.0,
        "gpu_peak_gb": None,
        "log": f"/work/{tool}-{mode}-0.log",
    }


def test_every_run_ok_is_no_failure():
    results = [run("peer", "bf16"), run("tunesmith", "bf16-packed")] * 2
    assert throughput.failures(results) == []


@pytest.mark.parametrize(
    "bad,said",
    [
        (run("peer", "bf16", code=1, tps=None), "peer bf16: exit 1, no tokens/s (log /work/peer-bf16-0.log)"),
        (run("peer", "bf16", code=0, tps=None), "peer bf16: exit 0, no tokens/s (log /work/peer-bf16-0.log)"),
        (run("tunesmith", "fp32", code=2), "tunesmith fp32: exit 2 (log /work/tunesmith-fp32-0.log)"),
    ],
    ids=["peer-exit-1", "peer-printed-no-tokens", "tunesmith-exit-2"],
)
def test_a_failed_run_is_a_failure(bad, said):
    assert throughput.failures([run("peer", "bf16"), run("tunesmith", "bf16-packed"), bad]) == [said]


def test_the_benchmark_exits_1_when_a_peer_run_failed(capsys):
    with pytest.raises(SystemExit) as caught:
        throughput.finish([run("tunesmith", "bf16-packed"), run("peer", "bf16", code=1, tps=None)])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert "peer bf16: exit 1, no tokens/s" in err and "no ratio" in err and "make bench" in err


def test_the_benchmark_returns_when_every_run_worked():
    assert throughput.finish([run("tunesmith", "bf16-packed"), run("peer", "bf16")]) is None


def test_a_missing_trl_is_said_before_any_run(tmp_path, monkeypatch):
    peer = tmp_path / "peer_trl_sft.py"
    peer.write_text("")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    problem = throughput.peer_problem(peer)
    assert "TRL is not installed" in problem and "make bench" in problem
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "trl" else real(name, *a))
    assert throughput.peer_problem(peer) is None
    assert "not found" in throughput.peer_problem(tmp_path / "nope.py")


def test_the_peer_dependency_is_declared_and_installed_by_make_bench():
    import re
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"trl\b", req) for req in extras["bench"])
    target = re.search(r"^bench:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert target and '".[bench]"' in target.group(1)


def test_a_baseline_checkout_gets_its_own_ratios_and_never_counts_as_tunesmith():
    results = [run("peer", "fp32", tps=100.0), run("tunesmith", "fp32", tps=150.0), run("baseline", "fp32", tps=200.0)]
    lines = throughput.summarize(results, {"fp32": 1e12, "bf16": 1e12}, 1_000_000)["lines"]
    # The baseline is faster here: were it taken for tunesmith, the first ratio would read 2.00.
    assert "ratio tunesmith/peer tokens/s: 1.50 (peak RSS ratio: 1.00)" in lines
    assert "ratio baseline/peer tokens/s: 2.00" in lines
    assert "ratio tunesmith/baseline tokens/s: 0.75" in lines


def test_without_a_baseline_there_is_no_baseline_ratio():
    lines = throughput.summarize([run("peer", "fp32"), run("tunesmith", "fp32")], {"fp32": 1e12}, 1)["lines"]
    assert not [x for x in lines if "baseline" in x]
