"""Security and privacy cases S1-S5 of docs/RELIABILITY.md section 4, on the tiny random Llama.

Every refusal goes through the real CLI in a subprocess (exit code, message, no traceback), and every
case has a control that shows the detector can fire: the planted pickle does run when unpickled, the
remote-code fixture does run when trusted, the audit hook does see a read, the byte grep does find a
canary that was written on purpose.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import stat
import string
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import instruction_rows, write_config, write_jsonl

from tunesmith.errors import UserError
from tunesmith.security import model_dir_problems

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
PKG = SRC / "tunesmith"


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)  # None: make sure the child does not inherit it
        else:
            env[key] = value
    return env


def cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunesmith", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=_env(env), timeout=timeout)


def flat(text: str) -> str:
    """Console output wrapped by rich, joined back: whitespace runs become one space."""
    return re.sub(r"\s+", " ", text)


def refused(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, our `error:` line, no traceback, and every needle in stderr."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "error:" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    for needle in needles:
        assert needle in res.stderr, (needle, res.stderr[-3000:])


def base_config(model: Path, **train) -> dict:
    """Relative data and output paths: a copy of the directory is a complete, independent run."""
    return {
        "name": "tiny",
        "output_dir": "runs",
        "seed": 0,
        "model": {"name": str(model)},
        "peft": {"method": "lora", "r": 4, "dropout": 0.0},
        "data": {"train": "data/train.jsonl", "validation": "data/val.jsonl", "format": "instruction",
                 "max_length": 128, "overlength": "drop"},
        "train": {"max_steps": 4, "lr": 1e-2, "batch_size": 4, "warmup_ratio": 0.0, **train},
        "eval": {"batch_size": 8, "max_new_tokens": 4, "samples": 0, "before_after": False, "generate_rows": 1},
    }


def write_data(root: Path) -> None:
    write_jsonl(root / "data" / "train.jsonl", instruction_rows(48))
    write_jsonl(root / "data" / "val.jsonl", instruction_rows(12, seed=1))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> Path:
    """One finished 4-step run with checkpoints step-2 and step-4; tests tamper with copies of it."""
    root = tmp_path_factory.mktemp("trained")
    write_data(root)
    write_config(root, base_config(tiny_llama, save_every=2))
    res = cli("train", "config.yaml", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (root / "runs/tiny/checkpoints").iterdir()) == ["step-2", "step-4"]
    return root


@pytest.fixture
def work(trained, tmp_path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(trained, w, symlinks=True)
    return w


def newest(work: Path) -> Path:
    return work / "runs/tiny/checkpoints/step-4"


def fix_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with a tampered file, so only a later check can catch it."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------------
# S1 A malicious pickle is never executed
# --------------------------------------------------------------------------------------------------

UNSAFE_PATTERNS = {
    "pickle.load": re.compile(r"\b(?:c?pickle|dill|cloudpickle|joblib)\.loads?\s*\("),
    "torch.load(": re.compile(r"\btorch\.load\s*\("),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "PrivacyEngine.load_checkpoint": re.compile(r"(?:PrivacyEngine|privacy_engine|engine)\.load_checkpoint\s*\("),
    "dcp.load / DCP.load": re.compile(r"\b(?:dcp|DCP|distributed_checkpoint)\.load\s*\("),
    "accelerator.load_state": re.compile(r"\.load_state\s*\("),  # Accelerate unpickles custom objects
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
}
UNSAFE_IMPORTS = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "torch.distributed.checkpoint"}


def unsafe_load_sites(files: list[Path]) -> list[str]:
    """Every textual hit of UNSAFE_PATTERNS, plus AST hits the text grep cannot see: importing a pickle
    module, `from torch import load`, or weights_only=False passed through a variable-free call."""
    hits = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for lineno, line in enumerate(text.splitlines(), 1):
            for label, pattern in UNSAFE_PATTERNS.items():
                if pattern.search(line):
                    hits.append(f"{path}:{lineno}: {label}: {line.strip()}")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.Import):
                hits += [f"{path}:{node.lineno}: import {a.name}" for a in node.names if a.name in UNSAFE_IMPORTS]
            elif isinstance(node, ast.ImportFrom):
                if node.module in UNSAFE_IMPORTS or (node.module == "torch" and any(a.name == "load" for a in node.names)):
                    hits.append(f"{path}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.keyword) and node.arg == "weights_only":
                if isinstance(node.value, ast.Constant) and node.value.value is False:
                    hits.append(f"{path}:{node.value.lineno}: weights_only=False (AST)")
    return hits


def test_s1_source_has_no_unsafe_load():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) >= 25, files  # the glob really sees the package
    assert unsafe_load_sites(files) == []


@pytest.mark.parametrize("planted", [
    "state = pickle.load(open(p, 'rb'))",
    "x = torch.load(path)",
    "x = torch.load(path, weights_only=False)",
    "PrivacyEngine.load_checkpoint(path=p, module=m)",
    "dcp.load(state, checkpoint_id=p)",
    "DCP.load(state, checkpoint_id=p)",
    "import pickle",
    "from torch import load as tl",
    "kw = dict(weights_only = False)",
    "accelerator.load_state(p)",
])
def test_s1_control_grep_finds_a_planted_occurrence(tmp_path, planted):
    clean = tmp_path / "clean.py"
    clean.write_text("import json\nstate = json.loads(text)\n")
    bad = tmp_path / "bad.py"
    bad.write_text(f"def f(p, path, state, m, accelerator):\n    {planted}\n")
    assert unsafe_load_sites([clean]) == []
    hits = unsafe_load_sites([clean, bad])
    assert hits and all(h.startswith(str(bad)) for h in hits), hits


class Payload:
    """Unpickling this runs code: it writes `sentinel`. Nothing in tunesmith may ever unpickle it."""

    def __init__(self, sentinel: Path):
        self.code = f"import pathlib; pathlib.Path({str(sentinel)!r}).write_text('pwned')"

    def __reduce__(self):
        return (builtins.exec, (self.code,))


PICKLES = ("rng_state.pth", "optimizer.pt", "training_args.bin")


def plant_pickles(ckpt: Path, sentinel: Path) -> None:
    for name in PICKLES:
        torch.save({"state": Payload(sentinel)}, ckpt / name)  # torch's zip pickle, as HF Trainer writes them


def test_s1_control_the_payload_is_live(tmp_path):
    """The planted files are real exploits: an unsafe load of any of them creates the sentinel."""
    for name in PICKLES:
        sentinel = tmp_path / f"sentinel-{name}"
        torch.save({"state": Payload(sentinel)}, tmp_path / name)
        assert not sentinel.exists()
        torch.load(tmp_path / name, weights_only=False)
        assert sentinel.read_text() == "pwned"
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Payload(tmp_path / "sentinel-raw")))
    pickle.loads(raw.read_bytes())
    assert (tmp_path / "sentinel-raw").exists()


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_s1_resume_refuses_planted_pickles(work, force_unsafe):
    sentinel = work.parent / "SENTINEL"
    plant_pickles(newest(work), sentinel)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1" if force_unsafe else None}
    res = cli("train", "config.yaml", "--resume", cwd=work, env=env)
    refused(res, "unexpected files", "step-4", *PICKLES)
    assert not sentinel.exists()
    assert all((newest(work) / n).exists() for n in PICKLES)  # refused, not "cleaned up" and carried on


def test_s1_fallback_skips_the_poisoned_checkpoint_without_loading_it(work):
    sentinel = work.parent / "SENTINEL"
    plant_pickles(newest(work), sentinel)
    res = cli("train", "config.yaml", "--resume", "--fallback", cwd=work,
              env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    out = flat(res.stdout + res.stderr)
    assert res.returncode == 0, out[-3000:]
    assert "skipping step-4" in out and "unexpected files" in out and "step-2" in out, out[-3000:]
    assert not sentinel.exists()


def test_s1_pickles_listed_in_a_forged_manifest_are_still_never_opened(work):
    """An attacker who also rewrites manifest.json gets the files accepted, yet nothing reads them:
    resume opens only *.safetensors and state.json."""
    sentinel = work.parent / "SENTINEL"
    ckpt = newest(work)
    plant_pickles(ckpt, sentinel)
    for name in PICKLES:
        fix_manifest(ckpt, name)
    res = cli("train", "config.yaml", "--resume", cwd=work, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resumed from" in flat(res.stdout + res.stderr)
    assert not sentinel.exists()


def _adapter_bin_run(work: Path, sentinel: Path) -> Path:
    """The finished run's adapter as a pickle only: adapter_model.safetensors replaced by a payload .bin."""
    adapter = work / "runs/tiny/adapter"
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"state": Payload(sentinel)}, adapter / "adapter_model.bin")
    return work / "runs/tiny"


@pytest.mark.parametrize("force_unsafe", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_s1_generate_never_executes_a_planted_adapter_pickle(work, force_unsafe):
    sentinel = work.parent / "SENTINEL"
    run = _adapter_bin_run(work, sentinel)
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1" if force_unsafe else None}
    res = cli("generate", run, "--prompt", "hi", "--max-new-tokens", "2", cwd=work, env=env)
    assert res.returncode != 0
    assert not sentinel.exists()


def test_s1_generate_refuses_a_pickle_adapter_with_our_error(work):
    run = _adapter_bin_run(work, work.parent / "SENTINEL")
    refused(cli("generate", run, "--prompt", "hi", "--max-new-tokens", "2", cwd=work), "adapter_model.bin")


# --------------------------------------------------------------------------------------------------
# S2 Tensor and state format, and tamper detection
# --------------------------------------------------------------------------------------------------

def test_s2_checkpoints_hold_only_safetensors_and_json(trained):
    for ckpt in (trained / "runs/tiny/checkpoints").iterdir():
        names = sorted(p.name for p in ckpt.iterdir())
        assert names == ["manifest.json", "optimizer.safetensors", "rng.safetensors", "state.json",
                         "trainable.safetensors"], names
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert set(manifest["files"]) == set(names) - {"manifest.json"}
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == digest


def test_s2_control_an_untampered_copy_resumes(work):
    res = cli("train", "config.yaml", "--resume", cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-4(step4of4)" in flat(res.stdout + res.stderr).replace(" ", "")


def _timed_refusal(work: Path, match: str) -> float:
    """In-process: how long pick_checkpoint takes to refuse the newest checkpoint."""
    from tunesmith.recipes.state import pick_checkpoint

    t0 = time.perf_counter()
    with pytest.raises(UserError, match=match):
        pick_checkpoint(work / "runs/tiny/checkpoints", fallback=False)
    return time.perf_counter() - t0


def test_s2_one_flipped_byte_is_a_hash_mismatch(work):
    f = newest(work) / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # inside the tensor bytes: the header still parses
    f.write_bytes(bytes(data))
    assert _timed_refusal(work, "hash mismatch") < 5.0
    t0 = time.perf_counter()
    res = cli("train", "config.yaml", "--resume", cwd=work)
    wall = time.perf_counter() - t0
    refused(res, "hash mismatch", "trainable.safetensors", "--fallback")
    assert wall < 120, wall  # the CLI also loads data and model before it verifies (see report)


@pytest.mark.parametrize("cut", ["half", "4-bytes"])
def test_s2_truncated_weights_are_refused(work, cut):
    f = newest(work) / "trainable.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2 if cut == "half" else 4])
    refused(cli("train", "config.yaml", "--resume", cwd=work), "trainable.safetensors")


def test_s2_header_length_field_of_2_pow_40_is_refused_by_the_header_check(work):
    ckpt = newest(work)
    f = ckpt / "trainable.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    fix_manifest(ckpt, "trainable.safetensors")  # the hash now agrees: only the header check can catch it
    assert _timed_refusal(work, "header size limit") < 5.0
    refused(cli("train", "config.yaml", "--resume", cwd=work), "header size limit", "trainable.safetensors")


def _bloated_header(f: Path, entries: int, name_len: int) -> int:
    """Keep the real tensors and add `entries` empty ones with long names; returns the header size."""
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    for i in range(entries):
        header[f"x{i:06d}".ljust(name_len, "x")] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])
    return len(blob)


def test_s2_a_100k_entry_header_over_the_limit_is_refused(work):
    ckpt = newest(work)
    size = _bloated_header(ckpt / "trainable.safetensors", 100_000, 200)
    assert size > 16 * 1024 * 1024 and (ckpt / "trainable.safetensors").stat().st_size > size  # a real header
    fix_manifest(ckpt, "trainable.safetensors")
    assert _timed_refusal(work, "header size limit") < 5.0
    refused(cli("train", "config.yaml", "--resume", cwd=work), "header size limit")


def test_s2_a_100k_entry_header_under_the_byte_limit_is_refused_cleanly(work):
    ckpt = newest(work)
    size = _bloated_header(ckpt / "trainable.safetensors", 100_000, 8)
    assert size < 16 * 1024 * 1024  # passes the byte cap: 100k entries in ~6 MB
    fix_manifest(ckpt, "trainable.safetensors")
    refused(cli("train", "config.yaml", "--resume", cwd=work), "trainable.safetensors")


def test_s2_fallback_uses_the_previous_checkpoint_and_finishes(work):
    f = newest(work) / "trainable.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    res = cli("train", "config.yaml", "--resume", "--fallback", cwd=work)
    out = flat(res.stdout + res.stderr)
    assert res.returncode == 0, out[-3000:]
    assert "skipping step-4" in out and "hash mismatch" in out, out[-3000:]
    assert "step-2(step2of4)" in out.replace(" ", ""), out[-3000:]
    run = work / "runs/tiny"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None][:4] == [1, 2, 3, 4]
    # step-4 was trained again and committed whole: it verifies now
    from tunesmith.training.checkpoint import verify

    verify(newest(work))


# --------------------------------------------------------------------------------------------------
# S3 Remote code
# --------------------------------------------------------------------------------------------------

REVISION = "0123456789abcdef0123456789abcdef01234567"


def remote_code_repo(tiny_llama: Path, dest: Path, sentinel: Path, model_type: str = "x-custom") -> Path:
    """A local model repo whose config names custom code that writes `sentinel` when imported."""
    shutil.copytree(tiny_llama, dest)
    (dest / "configuration_x.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(sentinel)!r}).write_text('executed')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class XConfig(LlamaConfig):\n    model_type = 'x-custom'\n")
    (dest / "modeling_x.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_x import XConfig\n\n\n"
        "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n")
    config = json.loads((dest / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    return dest


@pytest.fixture
def remote(tmp_path, tiny_llama):
    write_data(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    repo = remote_code_repo(tiny_llama, tmp_path / "repo", sentinel)
    cfg = base_config(repo, max_steps=1)
    return tmp_path, cfg, sentinel


def test_s3_remote_code_is_refused_by_default(remote):
    root, cfg, sentinel = remote
    write_config(root, cfg)
    res = cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")})
    refused(res, "custom code", "trust_remote_code")
    assert not sentinel.exists()
    assert not (root / "runs/tiny").exists()  # no half-made run left behind


@pytest.mark.parametrize("revision", [None, "main", REVISION.upper(), REVISION[:39]])
def test_s3_trust_remote_code_needs_a_40_hex_revision(remote, revision):
    root, cfg, sentinel = remote
    cfg["model"].update(trust_remote_code=True, revision=revision)
    write_config(root, cfg)
    res = cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")})
    refused(res, "model: trust_remote_code needs `revision` pinned to a 40-hex commit")
    assert not sentinel.exists()
    assert not (root / "runs").exists()  # a config error: nothing is created


def test_s3_control_trusted_and_pinned_runs_the_code_and_records_both(remote):
    """The fixture is live: with the opt-in the repo's code is imported (sentinel appears), and the run's
    config snapshot records trust_remote_code and the pinned revision."""
    root, cfg, sentinel = remote
    cfg["model"].update(trust_remote_code=True, revision=REVISION)
    write_config(root, cfg)
    res = cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")})
    assert res.returncode == 0, res.stderr[-3000:]
    assert sentinel.read_text() == "executed"
    snap = yaml.safe_load((root / "runs/tiny/config.yaml").read_text())
    assert snap["model"]["trust_remote_code"] is True and snap["model"]["revision"] == REVISION


@pytest.fixture(scope="module")
def known_type_remote_run(tmp_path_factory, tiny_llama):
    """auto_map next to a model_type transformers knows (llama): run once, shared by two tests."""
    root = tmp_path_factory.mktemp("known-type")
    write_data(root)
    sentinel = root / "SENTINEL"
    repo = remote_code_repo(tiny_llama, root / "repo", sentinel, model_type="llama")
    write_config(root, base_config(repo, max_steps=1))
    return cli("train", "config.yaml", cwd=root, env={"HF_HOME": str(root / "hf")}), sentinel


def test_s3_auto_map_with_a_known_model_type_never_runs_the_code(known_type_remote_run):
    res, sentinel = known_type_remote_run
    assert "Traceback" not in res.stderr
    assert not sentinel.exists()


def test_s3_auto_map_with_a_known_model_type_is_refused(known_type_remote_run):
    res, _ = known_type_remote_run
    refused(res, "auto_map")


def test_s3_a_dataset_loading_script_is_never_run(tmp_path, tiny_llama):
    write_data(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    script = f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('executed')\n"
    (tmp_path / "scripted").mkdir()
    (tmp_path / "scripted" / "scripted.py").write_text(script)
    write_jsonl(tmp_path / "scripted" / "train.jsonl", instruction_rows(8))
    cfg = base_config(tiny_llama, max_steps=1)
    for source, needle in (("scripted", "not a saved HF dataset"), ("scripted/scripted.py", "unknown file type")):
        cfg["data"]["train"] = source
        write_config(tmp_path, cfg)
        refused(cli("train", "config.yaml", "--overwrite", cwd=tmp_path), needle)
        assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------
# S4 Paths
# --------------------------------------------------------------------------------------------------

AUDITED_CLI = r"""
import json, os, sys
watched = set(json.loads(os.environ["TS_WATCH"]))
opened = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        try:
            real = os.path.realpath(os.fsdecode(args[0]))
        except Exception:
            return
        if real in watched:
            opened.append(real)
sys.addaudithook(hook)
import atexit
atexit.register(lambda: sys.stderr.write("\nAUDIT-OPENED " + json.dumps(opened) + "\n"))
from tunesmith.cli import main
sys.argv = ["tunesmith", *sys.argv[1:]]
main()
"""


def audited_cli(args: list, cwd: Path, watch: list[Path], home: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the CLI with an audit hook recording every open() of a watched file (symlinks resolved)."""
    env = _env({"TS_WATCH": json.dumps([os.path.realpath(p) for p in watch]), "HOME": str(home)})
    res = subprocess.run([sys.executable, "-c", AUDITED_CLI, *map(str, args)], capture_output=True, text=True,
                         cwd=cwd, env=env, timeout=600)
    found = re.findall(r"AUDIT-OPENED (.*)", res.stderr)
    assert found, res.stderr[-3000:]  # the hook ran to the end
    return res, json.loads(found[-1])


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = stat.S_IFMT(st.st_mode)
            # a directory's own mtime moves when an entry is added below it; the entry itself is what counts
            out[str(p.relative_to(root))] = (kind, 0, 0) if kind == stat.S_IFDIR else (kind, st.st_size, st.st_mtime_ns)
    return out


def changed_outside(before: dict, after: dict, allowed: list[str]) -> list[str]:
    changed = {k for k in after if before.get(k) != after[k]} | {k for k in before if k not in after}
    return sorted(k for k in changed if not any(k == a or k.startswith(a + os.sep) for a in allowed))


@pytest.fixture
def paths_env(tmp_path, tiny_llama):
    """tmp/a/b is the cwd (two levels deep); data lives there; a fake HOME, a decoy tmp/etc/passwd, a file
    outside the allowed root reached by a symlink, and a model dir whose tokenizer names ../.env."""
    cwd = tmp_path / "a" / "b"
    write_data(cwd)
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "todo.txt").write_text("nothing\n")
    decoy = tmp_path / "etc" / "passwd"
    decoy.parent.mkdir()
    decoy.write_text("root:x:0:0:decoy\n")
    outside = write_jsonl(tmp_path / "outside" / "secret.jsonl", instruction_rows(48, seed=7))
    (cwd / "data" / "link.jsonl").symlink_to(outside)
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_llama, model)
    (tmp_path / "models" / ".env").write_text("HF_TOKEN=hf_shouldneverbereadxxxxxxxxxxxx\n")
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["vocab_file"] = "../.env"
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return {
        "root": tmp_path, "cwd": cwd, "home": home, "tiny": tiny_llama, "model": model,
        "watch": [Path("/etc/passwd"), decoy, outside, tmp_path / "models" / ".env"],
        "roots": [str(cwd), str(tiny_llama)],
    }


def _case(env: dict, case: str) -> tuple[dict, list[str]]:
    cfg = base_config(env["tiny"], max_steps=1)
    if case == "dotdot-to-/etc/passwd":
        cfg["data"]["train"] = os.path.relpath("/etc/passwd", env["cwd"])
        return cfg, ["data.train", "system directory"]
    if case == "../../etc/passwd-outside-roots":
        cfg["data"]["train"] = "../../etc/passwd"  # the decoy tmp/etc/passwd: real, readable, outside the root
        cfg["allowed_roots"] = env["roots"]
        return cfg, ["data.train: ../../etc/passwd", "outside allowed_roots"]
    if case == "absolute-/etc/passwd":
        cfg["data"]["train"] = "/etc/passwd"
        return cfg, ["data.train: /etc/passwd", "system directory"]
    if case == "symlink-escaping-root":
        cfg["data"]["train"] = "data/link.jsonl"
        cfg["allowed_roots"] = env["roots"]
        return cfg, ["data.train: data/link.jsonl", "outside allowed_roots"]
    if case == "output_dir-home":
        cfg["output_dir"] = "~"
        return cfg, ["output_dir: ~", "use a dedicated directory"]
    if case == "tokenizer-vocab_file-../.env":
        cfg["model"]["name"] = str(env["model"])
        return cfg, ["vocab_file points outside the model directory (../.env)"]
    raise AssertionError(case)


CASES = ["dotdot-to-/etc/passwd", "../../etc/passwd-outside-roots", "absolute-/etc/passwd", "symlink-escaping-root",
         "output_dir-home", "tokenizer-vocab_file-../.env"]


@pytest.mark.parametrize("case", CASES)
def test_s4_path_is_refused_before_any_read_and_nothing_is_written_outside_output_dir(paths_env, case):
    cfg, needles = _case(paths_env, case)
    cwd, root = paths_env["cwd"], paths_env["root"]
    write_config(cwd, cfg)
    before = snapshot(root)
    res, opened = audited_cli(["train", "config.yaml"], cwd, paths_env["watch"], paths_env["home"])
    refused(res, *needles)
    assert opened == []
    output_dir = str(Path(os.path.relpath(cwd, root)) / "runs") if cfg["output_dir"] == "runs" else None
    assert changed_outside(before, snapshot(root), [output_dir] if output_dir else []) == []
    assert not (paths_env["home"] / "tiny").exists()


def test_s4_one_config_with_every_bad_path_lists_each(paths_env):
    cfg = base_config(paths_env["tiny"], max_steps=1)
    cfg["data"].update(train="/etc/passwd", validation="../../etc/passwd", test="data/link.jsonl")
    cfg["output_dir"] = "~"
    cfg["allowed_roots"] = paths_env["roots"]
    write_config(paths_env["cwd"], cfg)
    before = snapshot(paths_env["root"])
    res, opened = audited_cli(["train", "config.yaml"], paths_env["cwd"], paths_env["watch"], paths_env["home"])
    refused(res, "Refused paths", "output_dir: ~", "data.train: /etc/passwd", "data.validation: ../../etc/passwd",
            "data.test: data/link.jsonl")
    assert len(re.findall(r"^\s+- ", res.stderr, re.M)) == 4, res.stderr
    assert opened == []
    assert changed_outside(before, snapshot(paths_env["root"]), []) == []


def test_s4_control_the_audit_hook_sees_a_read_through_the_symlink(paths_env):
    """Without allowed_roots the same symlink is legitimate: `data check` reads through it and the hook
    records the target. An empty `opened` list above therefore means no read, not a blind hook."""
    cfg = base_config(paths_env["tiny"], max_steps=1)
    cfg["data"]["train"] = "data/link.jsonl"
    write_config(paths_env["cwd"], cfg)
    res, opened = audited_cli(["data", "check", "config.yaml"], paths_env["cwd"], paths_env["watch"],
                              paths_env["home"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.realpath(paths_env["watch"][2]) in opened


def test_s4_control_the_snapshot_sees_a_write(tmp_path):
    (tmp_path / "runs").mkdir()
    before = snapshot(tmp_path)
    (tmp_path / "runs" / "ok.txt").write_text("inside")
    assert changed_outside(before, snapshot(tmp_path), ["runs"]) == []
    (tmp_path / "stray.txt").write_text("outside")
    (tmp_path / "runs-not").mkdir()
    assert changed_outside(before, snapshot(tmp_path), ["runs"]) == ["runs-not", "stray.txt"]
    before = snapshot(tmp_path)
    (tmp_path / "stray.txt").write_text("changed!")
    assert changed_outside(before, snapshot(tmp_path), ["runs"]) == ["stray.txt"]


def test_s4_control_tokenizer_check_accepts_the_clean_model_and_flags_dot_env(tmp_path, tiny_llama):
    model = tmp_path / "m"
    shutil.copytree(tiny_llama, model)
    assert model_dir_problems(str(model)) == []
    cfg_path = model / "tokenizer_config.json"
    clean = json.loads(cfg_path.read_text())
    for value in ("../.env", ".env", "../../../etc/passwd"):
        cfg_path.write_text(json.dumps({**clean, "vocab_file": value}))
        assert model_dir_problems(str(model)), value


# --------------------------------------------------------------------------------------------------
# S5 Secrets never persist
# --------------------------------------------------------------------------------------------------

def canary(prefix: str = "hf_CANARY") -> str:
    rng = random.SystemRandom()
    return prefix + "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(30))


def grep_bytes(needles: list[bytes], blobs: dict[str, bytes]) -> list[str]:
    return [f"{where}: {n.decode()}" for where, blob in blobs.items() for n in needles if n in blob]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_s5_canaries_never_reach_output_logs_or_the_run_directory(tmp_path, tiny_llama):
    c_env, c_flag, c_field, c_url, c_err, c_drift = (canary() for _ in range(6))
    c_row = canary("ROWCANARY")  # not secret-shaped: redaction cannot hide a leak of row text
    rows = instruction_rows(48)
    rows.append({"instruction": "reverse the words " + " ".join([c_row] * 60), "output": "x"})  # overlength: dropped
    rows.append({"instruction": c_row, "output": [c_row]})  # wrong type: a bad row, skipped
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with open(tmp_path / "data" / "train.jsonl", "a") as f:
        f.write('{"instruction": "' + c_row + '", "output": \n')  # malformed JSON: a bad row, skipped
    write_jsonl(tmp_path / "data" / "val.jsonl", instruction_rows(12, seed=1))
    cfg = base_config(tiny_llama, max_steps=2, save_every=1)
    cfg["data"].update(prompt=f"Answer briefly. {c_field}", on_error="skip", max_bad_fraction=0.2)
    cfg["eval"].update(samples=1, before_after=True, baseline_model=f"https://oauth2:{c_url}@huggingface.co/org/m")
    write_config(tmp_path, cfg)
    env = {"HF_TOKEN": c_env}

    results = {
        "train": cli("train", "config.yaml", f"data.system_prompt=Be terse. {c_flag}", cwd=tmp_path, env=env),
        "data check": cli("data", "check", "config.yaml", f"data.system_prompt=Be terse. {c_flag}", cwd=tmp_path,
                          env=env),
        "bad override key": cli("train", "config.yaml", f"data.{c_err}=1", cwd=tmp_path, env=env),
        "bad override": cli("train", "config.yaml", c_err, cwd=tmp_path, env=env),
        "drift": cli("train", "config.yaml", f"data.system_prompt=Be terse. {c_drift}", "--resume", cwd=tmp_path,
                     env=env),
    }
    assert results["train"].returncode == 0, results["train"].stderr[-3000:]
    assert results["data check"].returncode == 0, results["data check"].stderr[-3000:]
    refused(results["bad override key"], "unknown key")
    refused(results["bad override"], "expected dotted.key=value")
    refused(results["drift"], "configuration changed", "data.system_prompt")

    run = tmp_path / "runs" / "tiny"
    blobs = {f"{name} {stream}": getattr(res, stream).encode() for name, res in results.items()
             for stream in ("stdout", "stderr")}
    blobs.update(files_under(run))
    assert any("checkpoints/step-2/" in k for k in blobs) and any(k.endswith("metrics.jsonl") for k in blobs)
    secrets_ = [c_env, c_flag, c_field, c_url, c_err, c_drift]
    needles = [c.encode() for c in secrets_ + [c_row]] + [c[len("hf_CANARY"):].encode() for c in secrets_]
    needles += [c_row[len("ROWCANARY"):].encode(), b"CANARY"]
    assert grep_bytes(needles, blobs) == []

    # the values did reach tunesmith: redacted in place, not silently dropped
    snap = yaml.safe_load((run / "config.yaml").read_text())
    assert snap["data"]["system_prompt"] == "Be terse. <redacted>"
    assert snap["data"]["prompt"] == "Answer briefly. <redacted>"
    assert snap["eval"]["baseline_model"] == "https://<redacted>@huggingface.co/org/m"
    report = json.loads((run / "data_report.json").read_text())
    assert report["bad_rows"] == {"malformed_json": 1, "wrong_type": 1}
    assert report["tokens"]["train"]["dropped_overlength"] == 1
    assert "<redacted>" in results["drift"].stderr


def test_s5_control_the_grep_finds_a_canary_written_on_purpose(tmp_path):
    c, row = canary(), canary("ROWCANARY")
    (tmp_path / "runs" / "ckpt").mkdir(parents=True)
    (tmp_path / "runs" / "ckpt" / "blob.bin").write_bytes(b"\x00\x01" + c.encode() + b"\xff")
    (tmp_path / "runs" / "log.txt").write_text(f"row text: {row}\n")
    blobs = files_under(tmp_path / "runs")
    hits = grep_bytes([c.encode(), row.encode(), b"CANARY"], blobs)
    assert len(hits) == 4 and any("blob.bin" in h for h in hits) and any("log.txt" in h for h in hits), hits
    assert grep_bytes([canary().encode()], blobs) == []  # a different canary is not found


def test_s5_resume_with_the_same_secret_bearing_config_is_not_drift(tmp_path, tiny_llama):
    write_data(tmp_path)
    cfg = base_config(tiny_llama, max_steps=1, save_every=1)
    cfg["data"]["system_prompt"] = f"Be terse. {canary()}"
    write_config(tmp_path, cfg)
    first = cli("train", "config.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    again = cli("train", "config.yaml", "--resume", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
