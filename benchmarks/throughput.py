"""Training throughput and memory of tunesmith against the peer (TRL SFTTrainer + PEFT LoRA), side by side.

Run:  .venv/bin/python benchmarks/throughput.py [--steps 6] [--rounds 2] [--peer-modes bf16] [--modes bf16-packed]

Both train the same model (the cached SmolLM2-135M safetensors, or with --random-init a randomly
initialised model of a named architecture), on the same data (Alpaca train), with the same LoRA shape
(r=16, alpha 32, all linear layers, no dropout), max length and batch, each in its own process:
A B A B over --rounds. Real (non-padding) tokens/s excludes each run's first step (warm-up); peak
RSS is the child's maximum resident set (wait4). MFU = tokens/s x 4 x parameters (a LoRA step's
forward and input-gradient backward; frozen weights get no weight gradient) over a matmul peak
measured here at the start. The last line is the ratio of medians, tunesmith's best mode over the
peer's best. With --baseline-src (the src/ folder of another tunesmith checkout, e.g. an older commit's
worktree), each round also runs that code's modes, labelled "baseline", and the last lines add its ratio
against the peer and against this code: a slowdown check in one invocation. Writes
benchmarks/results/throughput.json and appends nothing else: the .md is written by hand from it. The
peer needs TRL (`make bench`); without it the script stops before any run, and a run (peer or tunesmith)
that fails makes it exit 1 after writing what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_instructions" / "train.jsonl"
PEER = ROOT.parent / "shared" / "bench" / "peer_trl_sft.py"
# tunesmith modes: name -> config overrides
MODES = {
    "fp32": {"train": {"precision": "fp32"}, "data": {"packing": False}},
    "fp32-packed": {"train": {"precision": "fp32"}, "data": {"packing": True}},
    "bf16": {"train": {"precision": "bf16"}, "data": {"packing": False}},
    "bf16-packed": {"train": {"precision": "bf16"}, "data": {"packing": True}},
    "bf16-packed-gc": {"train": {"precision": "bf16", "gradient_checkpointing": True}, "data": {"packing": True}},
    # Frozen base weights stored in bf16 (the LoRA matrices stay fp32): autocast computes in bf16 anyway.
    "bf16w-packed-gc": {
        "train": {"precision": "bf16", "gradient_checkpointing": True},
        "data": {"packing": True},
        "model": {"dtype": "bfloat16"},
    },
    # The same config in a process started with one malloc arena (glibc's per-thread arenas can hold
    # freed activation memory). Kept as an experiment: see results/throughput.md for what it did.
    "bf16-packed-gc-arena1": {
        "train": {"precision": "bf16", "gradient_checkpointing": True},
        "data": {"packing": True},
        "env": {"MALLOC_ARENA_MAX": "1"},
    },
}
PEER_MODES = {"fp32": [], "packing": ["--packing"], "bf16": ["--bf16"], "bf16-packing": ["--bf16", "--packing"]}
ARCHS = {  # --random-init: throughput does not depend on weight values
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),  # a dry run of this script
    "llama-0.5b": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}


def matmul_peak(dtype: torch.dtype, device: str, seconds: float = 2.0) -> float:
    """FLOP/s of a square matrix product, the best of a few timed bursts."""
    n = 4096 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def run_child(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, float, float]:
    with open(log, "w") as f:
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - start, usage.ru_maxrss / 1024**2


def tunesmith_run(mode: str, model: str, a, out: Path, k: int, src: Path | None = None) -> dict:
    tool = "baseline" if src else "tunesmith"
    cfg = {
        "name": f"{tool}-{mode}-{k}",
        "output_dir": str(out / "runs"),
        "seed": 0,
        "model": {"name": model},
        "peft": {"method": "lora", "r": a.lora_r, "alpha": 2 * a.lora_r, "dropout": 0.0},
        "data": {
            "train": str(a.data),
            "format": "instruction",
            "max_length": a.max_length,
            "overlength": "truncate",
            "validation_fraction": 0.05,
        },
        "train": {
            "max_steps": a.steps + 1,
            "batch_size": a.batch_size,
            "lr": 2e-4,
            "warmup_steps": 0,
            "schedule": "cosine",
        },
        "eval": {
            "before_after": False,
            "samples": 0,
            "max_rows": 32,
            "generate_rows": 1,
            "max_new_tokens": 1,
            "batch_size": a.batch_size,
        },
    }
    env = {**os.environ, **MODES[mode].get("env", {})}
    if src:  # ahead of the installed (editable) tunesmith
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    for section, values in MODES[mode].items():
        if section != "env":
            cfg.setdefault(section, {}).update(values)
    path = out / f"{tool}-{mode}-{k}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = out / f"{tool}-{mode}-{k}.log"
    code, wall, rss = run_child([sys.executable, "-m", "tunesmith", "train", str(path), "--overwrite"], log, env)
    if code != 0:  # nothing to read: finish() reports it and the benchmark exits 1
        return {
            "tool": tool,
            "mode": mode,
            "exit": code,
            "tokens_per_s": None,
            "peak_rss_gb": round(rss, 2),
            "gpu_peak_gb": None,
            "wall_s": round(wall, 1),
            "log": str(log),
        }
    run = out / "runs" / f"{tool}-{mode}-{k}"
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    first, last = steps[0], steps[-1]  # tokens/s over steps 2..N: the first step is warm-up
    tps = (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])
    report = json.loads((run / "eval.json").read_text())
    return {
        "tool": tool,
        "mode": mode,
        "exit": code,
        "tokens_per_s": round(tps, 1),
        "peak_rss_gb": round(rss, 2),
        "gpu_peak_gb": report["training"].get("gpu_peak_gb"),
        "wall_s": round(wall, 1),
        "val_loss": report["finetuned"]["validation"]["loss"],
        "steps": len(steps),
        "log": str(log),
    }


def peer_run(mode: str, model: str, a, out: Path, k: int) -> dict:
    # On a GPU the memory that matters is the device's: a wrapper prints the peer's peak after it ends.
    wrap = (
        [
            sys.executable,
            "-c",
            "import atexit, json, runpy, sys, torch; atexit.register(lambda: print(json.dumps("
            "{'gpu_peak_gb': torch.cuda.max_memory_allocated() / 2**30}))); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')",
        ]
        if torch.cuda.is_available()
        else [sys.executable]
    )
    cmd = [
        *wrap,
        str(a.peer),
        "--model",
        model,
        "--data",
        str(a.data),
        "--steps",
        str(a.steps),
        "--batch-size",
        str(a.batch_size),
        "--max-length",
        str(a.max_length),
        "--lora-r",
        str(a.lora_r),
        *PEER_MODES[mode],
    ]
    log = out / f"peer-{mode}-{k}.log"
    code, wall, rss = run_child(cmd, log)
    res = {}
    for x in log.read_text().splitlines():
        if x.startswith("{"):
            try:
                res.update(json.loads(x))
            except ValueError:
                pass  # the Trainer prints Python dicts too
    return {
        "tool": "peer",
        "mode": mode,
        "exit": code,
        "tokens_per_s": res.get("tokens_per_s"),
        "peak_rss_gb": round(rss, 2),
        "gpu_peak_gb": res.get("gpu_peak_gb"),
        "wall_s": round(wall, 1),
        "log": str(log),
    }


def peer_problem(peer: Path) -> str | None:
    """Why the peer cannot run at all, said before any run (it runs under this interpreter)."""
    import importlib.util

    if not peer.is_file():
        return f"the peer script {peer} is not found (pass --peer, or --peer-modes '' to measure tunesmith alone)"
    if importlib.util.find_spec("trl") is None:
        return "TRL is not installed, and the peer is TRL's SFTTrainer: run `make bench` (pip install -e '.[bench]')"
    return None


def failures(results: list[dict]) -> list[str]:
    """Each run that exited non-zero or measured nothing: its numbers (and any ratio) would be missing."""
    return [
        f"{r['tool']} {r['mode']}: exit {r['exit']}"
        + ("" if r["tokens_per_s"] else ", no tokens/s")
        + f" (log {r['log']})"
        for r in results
        if r["exit"] != 0 or not r["tokens_per_s"]
    ]


def finish(results: list[dict]) -> None:
    """Exit 1 when a run failed: a benchmark that printed tunesmith's numbers and silently no ratio looked fine."""
    bad = failures(results)
    if not bad:
        return
    print("benchmark failed: " + "; ".join(bad), file=sys.stderr)
    if any(r["tool"] == "peer" for r in results if r["exit"] != 0 or not r["tokens_per_s"]):
        print("no ratio without the peer; it needs TRL (`make bench`)", file=sys.stderr)
    sys.exit(1)


def random_model(arch: str, out: Path) -> str:
    """A randomly initialised model of `arch` with the SmolLM2 tokenizer, saved as a local directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunesmith import models
    from tunesmith.config import ModelConfig

    path = out / f"random-{arch}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**ARCHS[arch], max_position_embeddings=2048)).save_pretrained(path)
        tok_dir = os.environ.get("TUNESMITH_TOKENIZER") or models.resolve(ModelConfig(name="smollm2-135m-instruct"))
        AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)
    return str(path)


def generation_speed(model_dir: str, device: str, data: Path, n: int = 16, new: int = 32) -> dict:
    """Examples/s of batched generation (tunesmith) against a one-prompt-at-a-time generate loop."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.data.tokenize import ensure_template, render_prompt
    from tunesmith.evaluation.generate import generate

    tok = AutoTokenizer.from_pretrained(model_dir)
    ensure_template(tok)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    rows = [json.loads(x) for x in data.read_text().splitlines()[:n]]
    prompts = [[{"role": "user", "content": r["instruction"]}] for r in rows]
    # Both stop at EOS as in real use; a batch runs until its longest answer ends, so this favours the loop.
    t = time.perf_counter()
    generate(model, tok, prompts, max_new_tokens=new, batch_size=n, device=device)
    batched = n / (time.perf_counter() - t)
    t = time.perf_counter()
    with torch.no_grad():
        for p in prompts:
            ids = tok(render_prompt(tok, p), add_special_tokens=False, return_tensors="pt").to(device)
            model.generate(
                **ids, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id
            )
    single = n / (time.perf_counter() - t)
    return {
        "examples": n,
        "new_tokens": new,
        "batched_per_s": round(batched, 3),
        "single_per_s": round(single, 3),
        "ratio": round(batched / single, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run (plus one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--modes", default="bf16-packed", help=f"tunesmith modes: {','.join(MODES)}")
    ap.add_argument("--peer-modes", default="bf16", help=f"peer modes: {','.join(PEER_MODES)}")
    ap.add_argument("--quality", action="store_true", help="also one fp32 unpacked tunesmith run (loss check)")
    ap.add_argument("--random-init", choices=sorted(ARCHS), help="a random model of this architecture")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--peer", type=Path, default=PEER)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--baseline-src", type=Path, help="src/ of another tunesmith checkout, run alongside")
    a = ap.parse_args()
    problem = peer_problem(a.peer) if a.peer_modes.strip(",") else None
    if problem:
        sys.exit(f"benchmark cannot run its peer: {problem}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="tunesmith-throughput-"))
    if a.random_init:
        model = random_model(a.random_init, work)
    else:
        from tunesmith import models
        from tunesmith.config import ModelConfig

        model = models.resolve(ModelConfig(name="smollm2-135m-instruct"))
    n_params = count_params(model)
    peaks = {"fp32": matmul_peak(torch.float32, device), "bf16": matmul_peak(torch.bfloat16, device)}
    print(
        f"device {device}; matmul peak fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} "
        f"GFLOP/s; model {model} ({n_params / 1e6:.1f}M parameters)",
        flush=True,
    )
    results = []
    for k in range(a.rounds):
        for mode in filter(None, a.peer_modes.split(",")):
            results.append(peer_run(mode, model, a, work, k))
            print(json.dumps(results[-1]), flush=True)
        for mode in filter(None, a.modes.split(",")):
            # the two checkouts swap places each round, so neither always runs on a warmer machine
            srcs = ((None, a.baseline_src) if k % 2 == 0 else (a.baseline_src, None)) if a.baseline_src else (None,)
            for src in srcs:
                results.append(tunesmith_run(mode, model, a, work, k, src))
                print(json.dumps(results[-1]), flush=True)
    if a.quality:
        results.append(tunesmith_run("fp32", model, a, work, a.rounds))
        print(json.dumps(results[-1]), flush=True)
    gen = generation_speed(model, device, a.data)
    print("generation " + json.dumps(gen), flush=True)
    summary = summarize(results, peaks, n_params)
    record = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""),
        "model": a.random_init or "smollm2-135m-instruct (cached safetensors)",
        "params": n_params,
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)} | {"data": str(a.data)},
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "runs": results,
        "summary": summary,
        "generation": gen,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    name = f"throughput-{device}{'-' + a.random_init if a.random_init else ''}.json"
    (a.out / name).write_text(json.dumps(record, indent=2, default=str) + "\n")
    for line in summary["lines"]:
        print(line)
    finish(results)


def count_params(model_dir: str) -> int:
    from math import prod

    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            total += sum(prod(st.get_slice(key).get_shape()) for key in st.keys())
    return total


def summarize(results: list[dict], peaks: dict, n_params: int) -> dict:
    med = {}
    for r in results:
        if r["exit"] == 0 and r["tokens_per_s"]:
            med.setdefault((r["tool"], r["mode"]), []).append(r)
    lines, table = [], {}
    for (tool, mode), rs in sorted(med.items()):
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        rss = statistics.median(r["peak_rss_gb"] for r in rs)
        peak = peaks["bf16" if "bf16" in mode else "fp32"]
        mfu = tps * 4 * n_params / peak
        gpu = statistics.median(r["gpu_peak_gb"] for r in rs) if rs[0].get("gpu_peak_gb") is not None else None
        table[f"{tool}:{mode}"] = {
            "tokens_per_s": tps,
            "peak_rss_gb": rss,
            "gpu_peak_gb": gpu,
            "mfu": round(mfu, 4),
            "runs": [r["tokens_per_s"] for r in rs],
        }
        lines.append(
            f"{tool:9s} {mode:13s} median {tps:8.1f} tokens/s  peak RSS {rss:5.2f} GB  MFU {100 * mfu:5.1f}%"
            + (f"  GPU peak {gpu:.2f} GiB" if gpu is not None else "")
            + f"  runs {[r['tokens_per_s'] for r in rs]}"
        )
    ours = [v for k, v in table.items() if k.startswith("tunesmith:")]
    peer = [v for k, v in table.items() if k.startswith("peer:")]
    if ours and peer:
        best, rival = max(ours, key=lambda v: v["tokens_per_s"]), max(peer, key=lambda v: v["tokens_per_s"])
        mem = (
            ("gpu_peak_gb", "GPU peak memory")
            if best.get("gpu_peak_gb") and rival.get("gpu_peak_gb")
            else ("peak_rss_gb", "peak RSS")
        )
        lines.append(
            f"ratio tunesmith/peer tokens/s: {best['tokens_per_s'] / rival['tokens_per_s']:.2f} "
            f"({mem[1]} ratio: {best[mem[0]] / rival[mem[0]]:.2f})"
        )
    base = [v for k, v in table.items() if k.startswith("baseline:")]
    if base and ours and peer:
        old = max(base, key=lambda v: v["tokens_per_s"])
        lines.append(f"ratio baseline/peer tokens/s: {old['tokens_per_s'] / rival['tokens_per_s']:.2f}")
        lines.append(f"ratio tunesmith/baseline tokens/s: {best['tokens_per_s'] / old['tokens_per_s']:.2f}")
    return {"table": table, "lines": lines}


if __name__ == "__main__":
    main()
