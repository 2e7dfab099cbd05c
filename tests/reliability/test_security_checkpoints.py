"""RELIABILITY.md S1 (a malicious pickle is never executed) and S2 (tensor and state format,
tamper detection), on the tiny random Llama through the real CLI. Each case has a control."""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import pickle
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from _security import PKG, cli, fix_manifest, flat, newest, refused, trained, work

from tunesmith.errors import UserError

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
                torch_load = node.module == "torch" and any(a.name == "load" for a in node.names)
                if node.module in UNSAFE_IMPORTS or torch_load:
                    hits.append(f"{path}:{node.lineno}: from {node.module} import ...")
            elif isinstance(node, ast.keyword) and node.arg == "weights_only":
                if isinstance(node.value, ast.Constant) and node.value.value is False:
                    hits.append(f"{path}:{node.value.lineno}: weights_only=False (AST)")
    return hits


def test_s1_source_has_no_unsafe_load():
    files = sorted(PKG.rglob("*.py"))
    assert len(files) >= 25, files  # the glob really sees the package
    assert unsafe_load_sites(files) == []


@pytest.mark.parametrize(
    "planted",
    [
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
    ],
)
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
    res = cli("train", "config.yaml", "--resume", "--fallback", cwd=work, env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
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
        assert names == [
            "manifest.json",
            "optimizer.safetensors",
            "rng.safetensors",
            "state.json",
            "trainable.safetensors",
        ], names
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
    header = json.loads(data[8 : 8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    for i in range(entries):
        header[f"x{i:06d}".ljust(name_len, "x")] = {"dtype": "F32", "shape": [0], "data_offsets": [end, end]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
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
