"""Two CPU processes over gloo (torchrun): the same run as one process, one run directory, and a
checkpoint that commits only when every rank has written its part (RELIABILITY.md K5).

Each run is `torchrun --nproc_per_node 2 <_harness.RUNNER> train CONFIG`, so faults (SIGKILL of one
rank) are installed the same way as in the single-process tests.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import TUNESMITH, run_cli  # noqa: E402
from _harness import (  # noqa: E402
    ENV,
    RUNNER,
    adapter,
    assert_tensors_equal,
    checkpoint_steps,
    cli,
    leftovers,
    records,
    rel_config,
    row_log,
    says,
    step_lines,
    write_config,
)

from tunesmith.recipes.state import REQUIRED  # noqa: E402
from tunesmith.training import checkpoint as ckpt  # noqa: E402

# 57 rows, 8 per step (4 per rank): the last step of each epoch (step 8) has 1 row, so rank 1 gets
# none and takes a zero-weight pass, and the epoch boundary falls inside the run. Dropout off: one
# process and two would draw their masks differently.
N_ROWS, STEPS = 57, 12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(tmp_path: Path, *args, fault: dict | None = None) -> subprocess.CompletedProcess:
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    launch = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(), runner)
    return run_cli(*args, program=launch, timeout=300, env={**ENV, "TS_FAULT": json.dumps(fault or {})})


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny_llama):
    """The uninterrupted runs: two processes of batch 4, and one process of batch 8."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg_dict = rel_config(tmp, tiny_llama, n_rows=N_ROWS, max_steps=STEPS, save_every=4, grad_accum=1, batch_size=4)
    cfg_dict["peft"]["dropout"] = 0.0
    cfg = write_config(tmp, cfg_dict)
    res = torchrun(tmp, "train", cfg, "name=two", fault={"record_rows": str(tmp / "rows-two.jsonl")})
    assert res.returncode == 0, res.stderr[-4000:]
    one = cli("train", cfg, "name=one", "train.batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]
    return tmp, cfg, res


def test_two_processes_match_one_with_the_same_global_batch(two):
    tmp, _, _ = two
    runs = tmp / "runs"
    a, b = step_lines(runs / "two"), step_lines(runs / "one")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))  # logged once, by the main process
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    got, want = adapter(runs / "two"), adapter(runs / "one")
    assert sorted(got) == sorted(want)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    loss = [json.loads((runs / n / "eval.json").read_text())["finetuned"]["validation"]["loss"] for n in ("two", "one")]
    assert loss[0] == pytest.approx(loss[1], abs=1e-5)


def test_the_shipped_accelerate_config_trains_like_torchrun(two):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml` (the shipped file) is the same launch as
    torchrun: here, without a GPU, two gloo ranks."""
    tmp, cfg, _ = two
    config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "ddp.yaml"
    launch = (
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--main_process_port",
        _free_port(),
        *TUNESMITH,
    )
    # output_dir apart: another test counts tmp/runs
    res = run_cli(
        "train", cfg, "name=acc", f"output_dir={tmp / 'accelerate-runs'}", program=launch, timeout=300, env=ENV
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads((tmp / "accelerate-runs" / "acc" / "run.json").read_text())["processes"] == 2
    got, want = adapter(tmp / "accelerate-runs" / "acc"), adapter(tmp / "runs" / "two")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_megatron_is_refused_with_a_clear_message_and_the_other_engines_run(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tunesmith.errors import UserError
    from tunesmith.training import processes

    monkeypatch.setattr(processes, "PartialState", lambda cpu: SimpleNamespace(distributed_type="MEGATRON_LM"))
    with pytest.raises(UserError, match="MEGATRON_LM engine is not supported"):
        processes.process_state()
    for engine in (DistributedType.MULTI_GPU, DistributedType.DEEPSPEED, DistributedType.FSDP):
        monkeypatch.setattr(processes, "PartialState", lambda cpu, e=engine: SimpleNamespace(distributed_type=e))
        assert processes.process_state().distributed_type == engine


# -- DeepSpeed ZeRO-2 (accelerate launch with the shipped configs/accelerate/zero2.yaml) --------------------


def apart(tmp: Path) -> str:
    """ZeRO runs of the shared fixture go to their own folder: another test counts tmp/runs."""
    return f"output_dir={tmp / 'zero-runs'}"


def zero2(
    tmp_path: Path, *args, fault: dict | None = None, launch: tuple = (), config: str | Path = "zero2.yaml"
) -> subprocess.CompletedProcess:
    """accelerate launch with a DeepSpeed config: a shipped one (by name) or a path."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make install installs it)")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("DeepSpeed's CPU accelerator compiles its shared-memory op: no C++ compiler here")
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    accelerate_config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / config  # or the path
    program = (
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config,
        *launch,
        "--main_process_port",
        _free_port(),
        runner,
    )
    return run_cli(*args, program=program, timeout=300, env={**ENV, "TS_FAULT": json.dumps(fault or {})})


def test_zero2_trains_like_ddp_and_saves_each_ranks_optimizer_partition(two):
    """ZeRO-2 partitions gradients and optimizer state; the update is DDP's: the same losses and adapter.
    The short last step of each epoch gives rank 1 no rows: its zero-weight pass keeps the per-backward
    gradient reduction in step."""
    tmp, cfg, _ = two
    res = zero2(tmp, "train", cfg, "name=zero2", apart(tmp))
    assert res.returncode == 0, res.stderr[-4000:]
    run, ddp = tmp / "zero-runs" / "zero2", tmp / "runs" / "two"
    assert json.loads((run / "run.json").read_text())["distributed"] == "DEEPSPEED"
    a, b = step_lines(run), step_lines(ddp)
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)  # DeepSpeed's pre-clip norm
    got, want = adapter(run), adapter(ddp)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    files = sorted(p.name for p in (run / "checkpoints" / "step-12").iterdir())
    assert files == sorted([*REQUIRED, "manifest.json", "rng-rank1.safetensors", "optimizer-rank1.safetensors"])
    # Each rank's file holds its half of the flat Adam moments, not a copy of the whole.
    parts = [
        load_file(str(run / "checkpoints" / "step-12" / f))
        for f in ("optimizer.safetensors", "optimizer-rank1.safetensors")
    ]
    total = sum(p.numel() for name, p in adapter(ddp).items())
    assert [sum(t.numel() for k, t in part.items() if k.endswith("exp_avg")) for part in parts] == [total // 2] * 2


def zero3_config(tmp: Path) -> Path:
    """A DeepSpeed JSON of the user's own, through accelerate's deepspeed_config_file. Persistence threshold 0:
    every parameter is partitioned (by default ones this small stay whole, and nothing would be gathered)."""
    ds_json = tmp / "zero3.json"
    ds_json.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        )
    )
    launch_config = tmp / "zero3-accelerate.yaml"
    launch_config.write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "DEEPSPEED",
                "num_machines": 1,
                "machine_rank": 0,
                "num_processes": 2,
                "use_cpu": False,
                "deepspeed_config": {"deepspeed_config_file": str(ds_json), "zero3_init_flag": False},
            }
        )
    )
    return launch_config


def sharded_and_one(two, engine: str, name: str, ref: str, *overrides) -> tuple[Path, Path]:
    """Run `name` on 2 ranks under ZeRO-3 (every parameter partitioned) or FSDP (the shipped file), and
    the one-process reference `ref` with the same global batch (once per module): their run directories."""
    tmp, cfg, _ = two
    args = (*overrides, apart(tmp))
    launch = zero3_config(tmp) if engine == "zero3" else "fsdp.yaml"
    res = zero2(tmp, "train", cfg, f"name={name}", *args, config=launch)
    assert res.returncode == 0, res.stderr[-4000:]
    if not (tmp / "zero-runs" / ref).exists():
        one = cli("train", cfg, f"name={ref}", "train.batch_size=8", *args)
        assert one.returncode == 0, one.stderr[-3000:]
    return tmp / "zero-runs" / name, tmp / "zero-runs" / ref


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_parameters_train_evaluate_and_save_like_one_process(two, engine):
    """ZeRO-3 and FSDP partition the parameters, and every forward gathers them (a collective). Evaluation
    of 5 rows in batches of 2 (rank 0: two batches, rank 1: one) and generation of 3 answers (2 and 1) run
    padded and in lock-step; the checkpoints' trainables and the saved adapter are gathered whole. FSDP
    runs through the shipped configs/accelerate/fsdp.yaml (on CPU ranks tunesmith engages it itself)."""
    run, ref = sharded_and_one(
        two, engine, engine, "one3", "eval.max_rows=5", "eval.generate_rows=3", "eval.batch_size=2"
    )
    assert json.loads((run / "run.json").read_text())["distributed"] == ("FSDP" if engine == "fsdp" else "DEEPSPEED")
    for ra, rb in zip(step_lines(run), step_lines(ref), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    got, want = adapter(run), adapter(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    shapes = [
        {k: tuple(v.shape) for k, v in load_file(str(r / "checkpoints" / "step-12" / "trainable.safetensors")).items()}
        for r in (run, ref)
    ]
    assert shapes[0] == shapes[1]
    evals = [json.loads((r / "eval.json").read_text())["finetuned"]["validation"] for r in (run, ref)]
    assert evals[0]["rows"] == 5 and evals[0].keys() == evals[1].keys()
    for key in evals[1]:
        assert evals[0][key] == pytest.approx(evals[1][key], rel=1e-5, abs=1e-6), key


def test_zero2_pads_a_rank_with_fewer_micro_batches(tmp_path, tiny_llama):
    """61 rows, 2 per micro-batch, 4 per rank: the epoch's last step has 5 rows, 3 on rank 0 (two
    micro-batches) and 2 on rank 1 (one). ZeRO-2 reduces in every backward, so rank 1 takes a zero-weight
    pass too; without it the ranks' collectives would not pair up."""
    cfg_dict = rel_config(tmp_path, tiny_llama, n_rows=61, max_steps=8, batch_size=2, grad_accum=2)
    cfg_dict["peft"]["dropout"] = 0.0
    cfg = write_config(tmp_path, cfg_dict)
    res = zero2(tmp_path, "train", cfg, "name=zero2", fault={"record_rows": str(tmp_path / "rows.jsonl")})
    assert res.returncode == 0, res.stderr[-4000:]
    last = [[r for r in row_log(tmp_path / "rows.jsonl") if r["data_step"] == 8 and r["rank"] == k] for k in (0, 1)]
    assert [len(m) for m in last] == [2, 2] and sum(len(m["ids"]) for m in last[0] + last[1]) == 5 + 1
    one = cli("train", cfg, "name=one", "train.batch_size=8", "train.grad_accum=1")
    assert one.returncode == 0, one.stderr[-3000:]
    for ra, rb in zip(step_lines(tmp_path / "runs" / "zero2"), step_lines(tmp_path / "runs" / "one"), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    got, want = adapter(tmp_path / "runs" / "zero2"), adapter(tmp_path / "runs" / "one")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_zero2_skips_a_non_finite_step_whole(two):
    """A NaN step is skipped before DeepSpeed applies it, and its reduced gradients are dropped: the run
    ends where one process with the same fault ends (not one more step behind, not NaN)."""
    tmp, cfg, _ = two
    fault = {"nan_data_steps": [3]}
    res = zero2(
        tmp, "train", cfg, "name=zero2-nan", "train.batch_size=2", "train.grad_accum=2", apart(tmp), fault=fault
    )
    assert res.returncode == 0, res.stderr[-4000:]
    one = cli("train", cfg, "name=one-nan", "train.batch_size=8", apart(tmp), fault=fault)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = tmp / "zero-runs"
    skipped = [r for r in records(runs / "zero2-nan") if r.get("skipped")]
    assert [r["data_step"] for r in skipped] == [3]
    assert [r["loss"] for r in step_lines(runs / "zero2-nan")] == pytest.approx(
        [r["loss"] for r in step_lines(runs / "one-nan")], abs=1e-5
    )
    got, want = adapter(runs / "zero2-nan"), adapter(runs / "one-nan")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp"])
def test_sharded_resume_after_killing_one_rank_matches_the_uninterrupted_run(two, engine):
    """Each rank reloads its own optimizer partition; under ZeRO-3 and FSDP the trainables are written back
    whole and partitioned again (ZeRO-3: with the fp32 master copy refreshed from them). The ZeRO-3 and FSDP
    runs also recompute activations (gradient checkpointing, reentrant there): the same numbers."""
    tmp, cfg, _ = two
    run = tmp / "zero-runs" / f"{engine}-killed"
    launch = {"zero2": {}, "zero3": {"config": zero3_config(tmp)}, "fsdp": {"config": "fsdp.yaml"}}[engine]
    args = ("train", cfg, f"name={engine}-killed", apart(tmp), f"train.gradient_checkpointing={engine != 'zero2'}")
    res = zero2(tmp, *args, fault={"kill_on_collate": 7, "rank": 1}, **launch)  # in step 7
    assert res.returncode != 0
    assert checkpoint_steps(run) == [4]
    res = zero2(tmp, *args, "--resume", **launch)
    assert res.returncode == 0, res.stderr[-4000:]
    assert says(res.stdout + res.stderr, "step-4 (step 4 of 12)")
    want = adapter(tmp / "runs" / "two")
    got = adapter(run)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_k5_a_rank_killed_before_its_optimizer_shard_leaves_the_checkpoint_uncommitted(two):
    """Under ZeRO-2 rank 1's part of a checkpoint is its RNG and its optimizer shard. Killed after the
    first and before the second (of the step-8 checkpoint), the checkpoint is never committed: the resume
    takes step-4 and ends where the uninterrupted run ends."""
    tmp, cfg, _ = two
    run = tmp / "zero-runs" / "k5-zero2"
    res = zero2(tmp, "train", cfg, "name=k5-zero2", apart(tmp), fault={"kill_before_optimizer_part": 2, "rank": 1})
    assert res.returncode != 0
    assert checkpoint_steps(run) == [4]
    ckpt.verify(run / "checkpoints" / "step-4", (*REQUIRED, "rng-rank1.safetensors", "optimizer-rank1.safetensors"))
    res = zero2(tmp, "train", cfg, "name=k5-zero2", apart(tmp), "--resume")
    assert res.returncode == 0, res.stderr[-4000:]
    assert says(res.stdout + res.stderr, "step-4 (step 4 of 12)")
    assert leftovers(run) == []  # the staging directory of the killed save was cleaned
    want, got = adapter(tmp / "runs" / "two"), adapter(run)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_deepspeed_refuses_what_it_would_silently_change(two):
    tmp, cfg, _ = two
    res = zero2(
        tmp, "train", cfg, "name=zero2-dp", apart(tmp), "privacy.noise_multiplier=1.0", config="zero3.yaml"
    )  # the shipped ZeRO-3 file
    assert res.returncode != 0  # each rank exits 2; the launcher reports a failed child
    assert "cannot run under DEEPSPEED" in res.stderr and "privacy (DP-SGD)" in res.stderr
    assert not (tmp / "zero-runs" / "zero2-dp").exists()  # no half-made run left behind


def test_evaluation_and_generation_are_sharded_and_gathered_in_order(two):
    """Each rank scores every second validation row and generates every second answer; the summed loss,
    the token count and the gathered answers' metrics equal the one-process run's."""
    tmp, _, _ = two
    two_eval, one_eval = (
        json.loads((tmp / "runs" / n / "eval.json").read_text())["finetuned"]["validation"] for n in ("two", "one")
    )
    assert two_eval["tokens"] == one_eval["tokens"] and two_eval["rows"] == one_eval["rows"] == 4
    generated = [k for k in one_eval if k not in ("loss", "perplexity", "tokens", "rows")]
    assert generated  # rougeL and the output statistics come from generation
    for key in generated:
        assert two_eval[key] == pytest.approx(one_eval[key], abs=1e-6), key


def test_each_row_once_per_epoch_and_one_run_directory(two):
    tmp, _, res = two
    log = row_log(tmp / "rows-two.jsonl")
    assert {r["rank"] for r in log} == {0, 1}
    steps_per_epoch = -(-N_ROWS // 8)
    last = [[i for r in log if r["data_step"] == steps_per_epoch and r["rank"] == k for i in r["ids"]] for k in (0, 1)]
    assert len(last[0]) == 1 and last[1] == last[0]  # rank 1's zero-weight pass reuses rank 0's one row
    learned = [
        i
        for r in log
        if r["data_step"] <= steps_per_epoch and not (r["rank"] == 1 and r["data_step"] == steps_per_epoch)
        for i in r["ids"]
    ]
    assert sorted(learned) == sorted(f"r{i}" for i in range(N_ROWS))  # every row, none twice
    for step in range(1, STEPS + 1):  # within a step the ranks never share a row (but for that pass)
        if step % steps_per_epoch == 0:
            continue
        by_rank = [{i for r in log if r["data_step"] == step and r["rank"] == k for i in r["ids"]} for k in (0, 1)]
        assert not by_rank[0] & by_rank[1]
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == ["one", "two"]
    run = tmp / "runs" / "two"
    assert sorted(p.name for p in (run / "checkpoints" / "step-12").iterdir()) == sorted(
        [*REQUIRED, "manifest.json", "rng-rank1.safetensors"]
    )
    assert res.stdout.count("Run directory:") + res.stderr.count("Run directory:") == 1  # one process talks


def test_resume_after_killing_one_rank_matches_the_uninterrupted_run(two, tmp_path):
    tmp, cfg, _ = two
    run = tmp / "runs" / "killed"
    res = torchrun(tmp, "train", cfg, "name=killed", fault={"kill_on_collate": 7, "rank": 1})  # in step 7
    assert res.returncode != 0
    assert checkpoint_steps(run) == [4]
    res = torchrun(tmp, "train", cfg, "name=killed", "--resume")
    assert res.returncode == 0, res.stderr[-4000:]
    assert says(res.stdout + res.stderr, "step-4 (step 4 of 12)")
    assert_tensors_equal(adapter(run), adapter(tmp / "runs" / "two"))


def test_k5_a_rank_killed_before_its_part_leaves_the_checkpoint_uncommitted(two):
    tmp, cfg, _ = two
    run = tmp / "runs" / "k5"
    res = torchrun(tmp, "train", cfg, "name=k5", fault={"kill_before_part": 2, "rank": 1})
    assert res.returncode != 0
    assert checkpoint_steps(run) == [4]  # step-8 was never committed: rank 1's part is missing
    ckpt.verify(run / "checkpoints" / "step-4", (*REQUIRED, "rng-rank1.safetensors"))
    res = torchrun(tmp, "train", cfg, "name=k5", "--resume")
    assert res.returncode == 0, res.stderr[-4000:]
    assert says(res.stdout + res.stderr, "step-4 (step 4 of 12)")
    assert leftovers(run) == []  # the staging directory of the killed save was cleaned
    assert_tensors_equal(adapter(run), adapter(tmp / "runs" / "two"))


def test_resume_on_another_number_of_processes_is_refused(two):
    tmp, cfg, _ = two
    res = cli("train", cfg, "name=two", "--resume", "train.max_steps=16", "--allow-drift")
    assert res.returncode == 2
    assert "saved with 2 processes, now 1" in res.stderr


def test_dp_sgd_on_two_processes_matches_one_process_on_the_same_sample(two):
    """Both ranks draw the same Poisson sample and clip their halves; the clipped sums are added across
    ranks before one noise draw. So two processes of batch 4 take the one-process step of batch 8."""
    tmp, cfg, _ = two
    dp = ("privacy.noise_multiplier=1.0", "peft.target_modules=[q_proj]")
    res = torchrun(tmp, "train", cfg, "name=dp2", *dp)
    assert res.returncode == 0, res.stderr[-4000:]
    one = cli("train", cfg, "name=dp1", "train.batch_size=8", *dp)
    assert one.returncode == 0, one.stderr[-3000:]
    runs = tmp / "runs"
    reports = [json.loads((runs / n / "eval.json").read_text()) for n in ("dp2", "dp1")]
    assert reports[0]["privacy"]["sample_rate"] == reports[1]["privacy"]["sample_rate"] == pytest.approx(8 / N_ROWS)
    assert reports[0]["epsilon"] == reports[1]["epsilon"] > 0
    two_w, one_w = adapter(runs / "dp2"), adapter(runs / "dp1")
    for k in one_w:
        assert torch.allclose(two_w[k], one_w[k], atol=1e-5, rtol=1e-5), k
    # The noise is in those weights: without it the same run ends elsewhere.
    quiet = cli(
        "train", cfg, "name=dp0", "train.batch_size=8", "privacy.noise_multiplier=0.0", "peft.target_modules=[q_proj]"
    )
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    quiet_w = adapter(runs / "dp0")
    assert any(not torch.allclose(quiet_w[k], one_w[k], atol=1e-3) for k in one_w)
    losses = [[r["loss"] for r in step_lines(runs / n)] for n in ("dp2", "dp1")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_generate_sharded_takes_every_world_th_prompt_and_restores_the_order(monkeypatch):
    """The order logic alone, with two fake ranks: rank r answers prompts r, r+2, ...; the gather puts
    every answer back at its prompt's index."""
    import accelerate.utils

    from tunesmith.evaluation import generate as gen

    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(5)]
    monkeypatch.setattr(
        gen, "generate", lambda model, tok, ps, *a, **k: ([p[0]["content"].upper() for p in ps], [True] * len(ps))
    )
    parts = {}

    class Rank:
        def __init__(self, index):
            self.process_index, self.num_processes = index, 2

    for rank in (0, 1):
        monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs, r=rank: parts.setdefault(r, objs) and [])
        gen.generate_sharded(Rank(rank), None, None, prompts)
    assert [i for i, _, _ in parts[0]] == [0, 2, 4] and [i for i, _, _ in parts[1]] == [1, 3]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: parts[1] + parts[0])  # any rank order
    outputs, stopped = gen.generate_sharded(Rank(0), None, None, prompts)
    assert outputs == ["P0", "P1", "P2", "P3", "P4"] and stopped == [True] * 5


def test_under_a_sharded_engine_generation_pads_the_short_rank_and_runs_in_lock_step(monkeypatch):
    """5 prompts on 2 ranks: rank 1 has 2, so it also answers a copy of prompt 0 (dropped), and both ask
    generate for synced steps (each rank keeps stepping until all are done: a forward is a collective)."""
    import accelerate.utils

    from tunesmith.evaluation import generate as gen
    from tunesmith.training import processes

    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(5)]
    calls = []

    def fake(model, tok, ps, *a, synced=False, **k):
        calls.append(([p[0]["content"] for p in ps], synced))
        return [p[0]["content"].upper() for p in ps], [True] * len(ps)

    class Rank:
        process_index, num_processes = 1, 2

    monkeypatch.setattr(processes, "collective_forward", lambda acc: True)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objs: objs)
    outputs, _ = gen.generate_sharded(Rank(), None, None, prompts, fn=fake)
    assert calls == [(["p1", "p3", "p0"], True)]
    assert outputs == ["P1", "P3"]  # the pad's answer is not gathered


@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_sharded_full_fine_tuning_saves_the_whole_model_of_one_process(two, engine):
    """Full fine-tuning with every parameter partitioned: the saved model directory (gathered whole) holds
    what one process trains."""
    from transformers import AutoModelForCausalLM

    run, ref = sharded_and_one(
        two, engine, f"full-{engine}", "full-one", "peft.method=full", "train.lr=1e-3", "train.max_steps=4"
    )
    got, want = (AutoModelForCausalLM.from_pretrained(r / "model").state_dict() for r in (run, ref))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
