"""K1 kill matrix (docs RELIABILITY.md section 5): SIGKILL a tiny training run at every file event of
its second checkpoint save, resume it with `tunesmith train --resume`, and compare the final adapter
with an uninterrupted run (torch.equal). A second variant first truncates the last-written file to 50%.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/kill_matrix.py [--workdir DIR]

The reference run is the real CLI in a fresh process. The faulty runs and the resumes are
`tunesmith.cli.main()` in forked children of this process, warmed up by one in-process run first (same
code, without the ~7 s of imports and first-call setup each); the warm-up and the probe run check that
in-process and forked runs train to the reference's exact weights. File events are counted with
`sys.addaudithook` (open for writing, os.rename/os.replace, os.remove, os.rmdir, os.mkdir,
shutil.rmtree) plus wrappers around os.fsync and around safetensors' save_file (it writes from Rust, out
of the audit hook's sight). An event's kill happens just before that event's operation; "after" kills
right after the save returns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

for var, value in (
    ("OMP_NUM_THREADS", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("HF_HUB_OFFLINE", "1"),
    ("COLUMNS", "500"),
):
    os.environ.setdefault(var, value)

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tunesmith import cli  # noqa: E402
from tunesmith.training import checkpoint as ckpt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class SaveEvents:
    """Counts the file events of each checkpoint save; kills the process at event `kill_at` of save 2."""

    def __init__(self, kill_at=None, truncate=False, record: Path | None = None):
        self.kill_at, self.truncate, self.record = kill_at, truncate, record
        self.save_no, self.index, self.in_save = 0, 0, False
        self.events: list[dict] = []
        self.last_written: str | None = None
        self.fsynced: set[str] = set()
        self.renames: list[tuple[str, str]] = []

    def install(self) -> None:
        real_save, real_save_file, real_fsync = ckpt.write_checkpoint, ckpt.save_file, os.fsync

        def write_checkpoint(*args, **kwargs):
            self.save_no, self.index, self.in_save = self.save_no + 1, 0, True
            self.last_written = None  # earlier saves' files are fsynced and committed: no torn write there
            try:
                return real_save(*args, **kwargs)
            finally:
                self.in_save = False
                self.flush()
                if self.save_no == 2 and self.kill_at == "after":
                    self.kill()

        def save_file(tensors, filename, *args, **kwargs):
            self.event("save_file", filename, writes=True)
            return real_save_file(tensors, filename, *args, **kwargs)

        def fsync(fd):
            self.event("fsync", os.readlink(f"/proc/self/fd/{fd}"))
            return real_fsync(fd)

        ckpt.write_checkpoint, ckpt.save_file, os.fsync = write_checkpoint, save_file, fsync
        sys.addaudithook(self.audit)

    def audit(self, name: str, args: tuple) -> None:
        if not self.in_save:
            return
        if name == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS)
            if writing and isinstance(path, (str, bytes, os.PathLike)):
                self.event("open-w", os.fsdecode(path), writes=True)
        elif name == "os.rename":
            self.event("rename", f"{os.fsdecode(args[0])} -> {os.fsdecode(args[1])}", rename=args[:2])
        elif name in ("os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree"):
            self.event(name.replace("os.", ""), os.fsdecode(args[0]))

    def event(self, kind: str, path: str, writes: bool = False, rename=None) -> None:
        if not self.in_save:
            return
        if self.save_no == 2 and self.index == self.kill_at:
            self.kill()
        self.events.append({"save": self.save_no, "index": self.index, "kind": kind, "path": str(path)})
        self.index += 1
        if writes:
            self.last_written = os.path.realpath(path)
        elif kind == "fsync":
            self.fsynced.add(os.path.realpath(path))
        if rename:
            self.renames.append((os.path.realpath(os.fsdecode(rename[0])), os.path.realpath(os.fsdecode(rename[1]))))

    def flush(self) -> None:
        if self.record:
            self.record.write_text(json.dumps(self.events))

    def kill(self) -> None:
        self.in_save = False  # the writes below are the harness's, not the save's
        note = {}
        if self.truncate and self.last_written:
            path = self.last_written
            for src, dst in self.renames:  # follow the file if its directory was renamed since it was written
                if path == src or path.startswith(src + os.sep):
                    path = dst + path[len(src) :]
            if os.path.isfile(path):
                size = os.path.getsize(path)
                os.truncate(path, size // 2)
                note = {"truncated": path, "bytes": [size, size // 2], "fsynced": self.last_written in self.fsynced}
            else:
                note = {"truncated": None, "missing": path}
        elif self.truncate:
            note = {"truncated": None, "missing": "nothing written in this save yet"}
        if self.record:
            self.record.with_suffix(".kill.json").write_text(json.dumps(note))
        os.kill(os.getpid(), signal.SIGKILL)


def run_child(argv: list[str], log: Path, events: SaveEvents | None = None, no_rng_restore: bool = False) -> int:
    """`tunesmith <argv>` in a forked child; its exit code, or -signal if it was killed."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if events:
                events.install()
            if no_rng_restore:
                ckpt.set_rng_state = lambda meta, tensors: None
            sys.argv = ["tunesmith", *argv]
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def steps_in(run: Path) -> list[int]:
    root = run / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*")) if root.is_dir() else []


def debris(run: Path) -> list[str]:
    root = run / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


def logged_steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def short(path: str, work: Path) -> str:
    path = re.sub(re.escape(str(work / "runs")) + r"/[^/ ]+/checkpoints/?", "checkpoints/", path)
    return re.sub(r"(\.(?:staging|old)-step-\d+)-\d+", r"\1-<pid>", path)


def setup(work: Path, max_steps: int) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "from conftest import build_tiny_llama; build_tiny_llama(Path(sys.argv[2]))",
            str(TESTS),
            str(work / "model"),
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(TESTS))
    from conftest import instruction_rows, write_jsonl

    write_jsonl(work / "data" / "train.jsonl", instruction_rows(64))
    write_jsonl(work / "data" / "val.jsonl", instruction_rows(12, seed=1))
    cfg = {
        "name": "reference",
        "output_dir": str(work / "runs"),
        "seed": 0,
        "model": {"name": str(work / "model")},
        "peft": {"method": "lora", "r": 4, "dropout": 0.1},
        "data": {
            "train": str(work / "data" / "train.jsonl"),
            "validation": str(work / "data" / "val.jsonl"),
            "format": "instruction",
            "max_length": 128,
            "overlength": "drop",
        },
        "train": {
            "max_steps": max_steps,
            "lr": 1e-2,
            "batch_size": 4,
            "grad_accum": 2,
            "warmup_steps": 2,
            "save_every": 2,
            "save_total_limit": 1,
        },
        "eval": {
            "batch_size": 8,
            "max_new_tokens": 2,
            "samples": 0,
            "before_after": False,
            "generate_rows": 2,
            "max_rows": 4,
        },
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_case(work: Path, cfg: Path, ref: dict, k, truncate: bool) -> dict:
    name = f"k{k if k == 'after' else f'{k:02d}'}-{'trunc' if truncate else 'kill'}"
    run, logs = work / "runs" / name, work / "logs"
    marker = logs / f"{name}.events.json"
    rc = run_child(["train", str(cfg), f"name={name}"], logs / f"{name}.kill.log", SaveEvents(k, truncate, marker))
    note_file = marker.with_suffix(".kill.json")
    kill_note = json.loads(note_file.read_text()) if note_file.exists() else {}
    case = {
        "name": name,
        "k": k,
        "variant": "truncate" if truncate else "kill",
        "killed": rc == -9,
        "after_kill": steps_in(run),
        "debris": debris(run),
        "note": kill_note,
    }
    rc = run_child(["train", str(cfg), f"name={name}", "--resume"], logs / f"{name}.resume.log")
    text = " ".join((logs / f"{name}.resume.log").read_text().split())
    case["resume_rc"], case["fallback"] = rc, False
    if rc != 0:
        found = re.search(r"error: Refusing to resume: \S*/(step-\d+: .*?)(?: Resume with|$)", text)
        case["refusal"] = found.group(1) if found else text[-200:]
        rc = run_child(["train", str(cfg), f"name={name}", "--resume", "--fallback"], logs / f"{name}.fallback.log")
        text = " ".join((logs / f"{name}.fallback.log").read_text().split())
        case["fallback"], case["fallback_rc"] = True, rc
    found = re.search(r"Resumed from \S*/step-(\d+)", text)
    case["resumed_from"] = int(found.group(1)) if found else None
    case["exact"] = rc == 0 and same(adapter(run), ref)
    steps = logged_steps(run) if rc == 0 else []
    case["log_ok"] = rc == 0 and steps == list(range(1, len(steps) + 1))  # each update logged once, in order
    case["debris_after"] = debris(run)
    return case


def describe(case: dict) -> str:
    resumed = f"step-{case['resumed_from']}" if case["resumed_from"] else "step 0 (no checkpoint)"
    bits = [
        f"{case['name']:<12}",
        "killed" if case["killed"] else "NOT KILLED",
        f"ckpts {case['after_kill'] or '-'}",
        f"resume {resumed}",
    ]
    if case["note"].get("truncated"):
        fsynced = " (fsynced)" if case["note"]["fsynced"] else ""
        bits.append(f"truncated {Path(case['note']['truncated']).name}{fsynced}")
    elif case["variant"] == "truncate":
        bits.append("nothing to truncate")
    if case["fallback"]:
        bits.append(f"plain resume refused ({case['refusal'][:80]}); --fallback")
    bits.append("EXACT" if case["exact"] else "DIFFERENT")
    if not case["log_ok"]:
        bits.append("metrics.jsonl has repeated steps")
    if case["debris_after"]:
        bits.append(f"debris {case['debris_after']}")
    return " | ".join(bits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="Scratch directory (default: a new temp dir).")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability.md")
    ap.add_argument("--max-steps", type=int, default=6, help="Updates per run; saves every 2 (the 2nd save is step-4).")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kill-matrix-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    cfg = setup(work, args.max_steps)

    res = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(cfg)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"reference run failed:\n{res.stderr[-3000:]}")
    ref = adapter(work / "runs" / "reference")
    # Warm up this process (lazy imports, first-call setup: ~3 s) so that every forked child starts warm.
    log = open(work / "logs" / "warmup.log", "w")
    with log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            sys.argv = ["tunesmith", "train", str(cfg), "name=warmup"]
            cli.main()
        except SystemExit as exc:
            if exc.code:
                sys.exit(f"warm-up run failed; see {work}/logs/warmup.log")
    if not same(adapter(work / "runs" / "warmup"), ref):
        sys.exit("an in-process run does not reproduce the CLI reference")

    probe = SaveEvents(record=work / "logs" / "probe.events.json")
    rc = run_child(["train", str(cfg), "name=probe"], work / "logs" / "probe.log", probe)
    events = json.loads((work / "logs" / "probe.events.json").read_text())
    if rc != 0 or not same(adapter(work / "runs" / "probe"), ref):
        sys.exit(f"probe run (forked child) rc={rc} does not reproduce the reference; see {work}/logs/probe.log")
    per_save = [sum(1 for e in events if e["save"] == n) for n in range(1, max(e["save"] for e in events) + 1)]
    second = [e for e in events if e["save"] == 2]
    print(
        f"reference: {args.max_steps} updates, a save every 2 (save_total_limit 1); "
        "the in-process warm-up and the forked probe reproduce it exactly"
    )
    print(f"file events per save: {per_save}; killing at each of the {len(second)} events of save 2, and after it")
    for e in second:
        print(f"  event {e['index']:2d}: {e['kind']:<13} {short(e['path'], work)}")

    cases = []
    for k in [e["index"] for e in second] + ["after"]:
        for truncate in (False, True):
            case = run_case(work, cfg, ref, k, truncate)
            cases.append(case)
            print(describe(case), flush=True)

    # Control: the comparison can fail. Same kill, resumed without restoring the random streams.
    name = "control-no-rng"
    run_child(["train", str(cfg), f"name={name}"], work / "logs" / f"{name}.kill.log", SaveEvents(0))
    run_child(
        ["train", str(cfg), f"name={name}", "--resume"], work / "logs" / f"{name}.resume.log", no_rng_restore=True
    )
    control_differs = not same(adapter(work / "runs" / name), ref)
    verdict = "differs, as it must" if control_differs else "EQUAL: the check is blind"
    print(f"control (resume without the RNG restore): {verdict}")

    for line in summarize(cases):
        print(line)
    write_report(args.out, work, args.max_steps, per_save, second, cases, control_differs, time.time() - t0)


LOG_NOTE = """
"A step logged twice": when `--fallback` finds no valid checkpoint, tunesmith/recipes/loop.py `train()` starts
over from step 0 but only truncates metrics.jsonl when it resumed from a checkpoint, so steps 1..k appear twice.
The weights are still exact (training from step 0 is deterministic).
"""


def summarize(cases: list[dict]) -> list[str]:
    """The K1 expectations, counted: exact weights, the right checkpoint, no debris, a clean log."""
    lines = []
    for variant in ("kill", "truncate"):
        cs = [c for c in cases if c["variant"] == variant]
        plain = [c for c in cs if not c["fallback"]]
        fell_back = [c for c in cs if c["fallback"]]
        line = (
            f"{variant}: {sum(c['exact'] for c in cs)}/{len(cs)} exact; {len(plain)} with a plain --resume, "
            f"{sum(c['resumed_from'] == max(c['after_kill'], default=None) for c in plain)} of them from the "
            f"newest committed checkpoint"
        )
        if fell_back:
            restarted = [c for c in fell_back if c["resumed_from"] is None]
            reasons = ", ".join(sorted({c["refusal"] for c in fell_back}))
            line += (
                f"; {len(fell_back)} refused a cut committed file ({reasons})"
                f" and needed --fallback: {len(fell_back) - len(restarted)} from an older checkpoint, "
                f"{len(restarted)} from step 0 (no valid checkpoint left)"
            )
        lines.append(line)
    lines.append(
        f"staging debris left after the resume: {sum(bool(c['debris_after']) for c in cases)}/{len(cases)}; "
        f"metrics.jsonl with a step logged twice: {sum(not c['log_ok'] for c in cases)}/{len(cases)}"
    )
    lines.append(f"{sum(c['exact'] for c in cases)}/{len(cases)} resumed exactly")
    return lines


def write_report(
    out: Path, work: Path, max_steps: int, per_save, second, cases, control_differs: bool, seconds: float
) -> None:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    by_k = {(c["k"], c["variant"]): c for c in cases}
    control = "differs, so the comparison can fail" if control_differs else "EQUAL - the check is blind"

    def cell(c: dict) -> str:
        resumed = f"step-{c['resumed_from']}" if c["resumed_from"] else "step 0"
        parts = [f"{c['after_kill'] or '-'} → {resumed}"]
        if c["note"].get("truncated"):
            parts.append(f"cut {Path(c['note']['truncated']).name}{' (fsynced)' if c['note']['fsynced'] else ''}")
        elif c["variant"] == "truncate":
            parts.append("nothing to cut")
        if c["fallback"]:
            parts.append("refused, --fallback")
        if not c["log_ok"]:
            parts.append("log repeats steps")
        parts.append("**exact**" if c["exact"] else "**DIFFERENT**")
        return "; ".join(parts)

    rows = [
        f"| {e['index']} | {e['kind']} | `{short(e['path'], work)}` | {cell(by_k[(e['index'], 'kill')])} | "
        f"{cell(by_k[(e['index'], 'truncate')])} |"
        for e in second
    ]
    rows.append(f"| after | save returned | | {cell(by_k[('after', 'kill')])} | {cell(by_k[('after', 'truncate')])} |")
    text = (
        f"""# Reliability: K1 kill matrix

Machine: {platform.node()} ({cpu}, {os.cpu_count()} CPUs), Python {platform.python_version()}, \
torch {torch.__version__}, one thread.
Command: `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/kill_matrix.py` ({seconds:.0f} s).

Tiny random Llama (tests/conftest.py), LoRA r=4 with dropout 0.1, 64 rows, batch 4 x GA 2, {max_steps} updates,
a checkpoint every 2 updates with `save_total_limit: 1` (so the second save, step-4, also deletes step-2).
File events per save: {per_save}. Each of the {len(second)} events of the second save (and the moment after it
returns) is a kill point: the run SIGKILLs itself just before that operation, then `tunesmith train --resume`
runs in a new process (`--fallback` only if the plain resume refuses). The truncate variant first cuts the
last file this save wrote to half its size, following its directory through the commit rename. A torn write
is only possible for a file not yet fsynced; cutting a file marked "(fsynced)" models storage corruption of a
committed checkpoint instead, which verification must detect (then `--fallback` is the documented way on).

Result (final adapter `torch.equal` to the uninterrupted run):

"""
        + "\n".join(f"- {line}" for line in summarize(cases))
        + f"""

Control (resumed without restoring the RNG): {control}.
{LOG_NOTE if any(not c["log_ok"] for c in cases) else ""}
Cells: checkpoints present after the kill → checkpoint the resume started from; outcome.

| # | event | path | kill | truncate last write to 50%, then kill |
|---|---|---|---|---|
"""
        + "\n".join(rows)
        + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Sections written by hand after the matrix (the bad-input figures) survive reruns.
    rest = out.read_text().partition("\n# Bad input")[2] if out.exists() else ""
    out.write_text(text + (f"\n# Bad input{rest}" if rest else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
