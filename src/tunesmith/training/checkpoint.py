"""Complete, atomic checkpoints in safetensors + JSON (never pickle).

A checkpoint is staged in a hidden directory next to its destination, every file fsynced, a
manifest of sha256 hashes written last, and committed by one rename. A directory named
``step-N`` therefore always holds a complete checkpoint; staging leftovers are ignored and cleaned.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from tunesmith.errors import TrainingHalted, UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def whole(t: torch.Tensor) -> torch.Tensor:
    """An FSDP (DTensor) parameter's whole value, gathered from every rank (a collective); else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (whole) laid out like `param`: for an FSDP parameter, this rank's shard of it."""
    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Optimizer state as tensors plus JSON. Under FSDP the state is sharded like the parameters: this
    rank's shard is saved (each rank writes its own part)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                local = v.to_local() if isinstance(v, DTensor) else v
                tensors[f"{pid}.{k}"] = local.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def optimizer_from_tensors(opt: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    saved, now = [len(g["params"]) for g in meta["param_groups"]], [len(g["params"]) for g in opt.param_groups]
    if saved != now:  # torch would refuse with a bare ValueError
        raise UserError(
            "The checkpoint's optimizer state does not fit this config's optimizer",
            [f"parameters per group: {saved} saved, {now} now"],
            hint="train.head_lr and train."
            "layer_decay group the parameters by rate: resume with the values the run was saved with.",
        )
    params = [p for group in opt.param_groups for p in group["params"]]  # the order state ids count in
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        param = params[int(pid)] if int(pid) < len(params) else None
        if isinstance(param, DTensor) and torch.is_tensor(v) and v.dim():  # this rank's shard, back in place
            v = DTensor.from_local(
                v.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            )
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def staging_dir(root: Path, step: int) -> Path:
    # A fixed name, so every rank of a multi-process run writes its part into the same directory.
    return root / f".staging-step-{step}"


def begin(root: Path, step: int) -> Path:
    """A fresh staging directory next to the destination (same filesystem: the commit is a rename)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(root, step)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def write_part(staging: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict | None = None) -> None:
    """Write tensor files into the staging directory and fsync them. `meta` (JSON-able) rides in the
    safetensors header, so a rank's part is one file."""
    header = {"meta": json.dumps(meta)} if meta is not None else None
    for fname, tdict in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tdict.items()}, str(staging / fname), metadata=header)
        _fsync(staging / fname)


def commit(root: Path, step: int, state: dict, keep: int | None = None) -> Path:
    """state.json, then the manifest of every staged file (all ranks' parts), then one rename."""
    staging, final = staging_dir(root, step), root / f"step-{step}"
    (staging / "state.json").write_text(json.dumps(state, indent=1))
    _fsync(staging / "state.json")
    files = sorted(p.name for p in staging.iterdir())
    manifest = {"step": step, "files": {name: _sha256(staging / name) for name in files}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(staging / MANIFEST)
    _fsync(staging)
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(staging, final)
    _fsync(root)
    if keep is not None:
        # Rotation only after the new checkpoint is committed: a crash never leaves zero checkpoints.
        # Checkpoints numbered above this one belong to a run abandoned by --fallback; the one just
        # committed is never a candidate.
        others = [c for c in list_checkpoints(root) if c != final]
        newer = [c for c in others if int(STEP_DIR.match(c.name).group(1)) > step]
        older = [c for c in others if c not in newer]
        for old in newer + older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_checkpoint(
    root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep: int | None = None, parts=None
) -> Path:
    """Write `tensors` (file name -> tensors) and `state` as checkpoint `root/step-<step>`.
    `parts`, if given, is called between staging and commit: other ranks write their files then."""
    staging = begin(root, step)
    try:
        if parts is not None:
            parts(staging)
        write_part(staging, tensors)
        return commit(root, step, state, keep)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if _disk_full(exc):
            needed = checkpoint_bytes(tensors)
            raise DiskFull(
                f"No space left on device while writing checkpoint step-{step} in {root}: it needs "
                f"about {_mb(needed)}, {_mb(shutil.disk_usage(root).free)} are free. "
                f"The previous checkpoint is intact and no step-{step} was committed; free space "
                "and continue with --resume."
            ) from None
        raise


def load_part_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["meta"])


class DiskFull(TrainingHalted):
    pass


def _disk_full(exc: BaseException) -> bool:
    # safetensors reports a full disk as SafetensorError with the OS message, not as OSError(ENOSPC).
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def _mb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e6:,.1f} MB)"


def checkpoint_bytes(tensors: dict[str, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for tdict in tensors.values() for t in tdict.values())


def low_space_warning(root: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """A warning when free space is under twice a checkpoint's size: the next save (staged next to
    the current one before rotation) may not fit."""
    root.mkdir(parents=True, exist_ok=True)
    needed, free = checkpoint_bytes(tensors), shutil.disk_usage(root).free
    if free < 2 * needed:
        return f"low disk space in {root}: {_mb(free)} free, a checkpoint takes about {_mb(needed)}"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


MAX_HEADER = 16 * 1024 * 1024  # a safetensors header past this is a denial-of-service attempt, not weights


def _check_header(path: Path) -> None:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
    if size > MAX_HEADER or size > path.stat().st_size:
        raise UserError(f"{path.parent}: {path.name} exceeds the header size limit ({size} bytes)")


def verify(ckpt: Path, required: tuple[str, ...] = ()) -> dict:
    """Refuse anything but a complete checkpoint exactly as it was written: every file listed, every
    hash equal, no extra files (a planted pickle next to the weights is never even opened)."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.exists():
        raise UserError(f"{ckpt}: incomplete checkpoint (missing {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{ckpt}: unreadable {MANIFEST}") from None
    missing = [name for name in required if name not in files or not (ckpt / name).exists()]
    missing += [name for name in files if name not in missing and not (ckpt / name).exists()]
    if missing:
        raise UserError(f"{ckpt}: incomplete checkpoint", [f"missing {name}" for name in missing])
    extra = sorted(p.name for p in ckpt.iterdir() if p.name not in files and p.name != MANIFEST)
    if extra:
        raise UserError(f"{ckpt}: unexpected files (not written by tunesmith; never loaded)", extra)
    for name, digest in files.items():
        if name.endswith(".safetensors"):
            _check_header(ckpt / name)
        if _sha256(ckpt / name) != digest:
            raise UserError(f"{ckpt}: hash mismatch in {name}")
    return manifest


def latest_checkpoint(root: Path) -> Path | None:
    leftovers = [*root.glob(".staging-step-*"), *root.glob(".old-step-*")] if root.is_dir() else []
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    ckpts = list_checkpoints(root)
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt: Path, required: tuple[str, ...] = ()) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    manifest = verify(ckpt, required)
    state = json.loads((ckpt / "state.json").read_text())
    tensors = {name: load_file(str(ckpt / name)) for name in manifest["files"] if name.endswith(".safetensors")}
    return state, tensors
