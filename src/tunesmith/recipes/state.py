"""A run's full training state to and from checkpoints: weights, optimizer, schedule, RNG, data position.

Resume is exact because nothing is left out: the batch plan is a pure function of the data step,
and every random stream (python, numpy, torch, cuda) is restored. A checkpoint that is incomplete,
tampered with, or made from other data or settings is refused before any training step.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from tunesmith.errors import UserError
from tunesmith.training import checkpoint as ckpt
from tunesmith.training import zero

if TYPE_CHECKING:
    from tunesmith.recipes.building import Setup

EXCLUDED = "excluded_rows.json"  # train rows removed by spike rollbacks, kept across resumes
REQUIRED = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


def trainable_state(s: Setup) -> dict[str, torch.Tensor]:
    model = s.accelerator.unwrap_model(s.model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with zero.gathered(s.engine, list(trainable.values())):  # ZeRO-3: whole tensors
        return {n: ckpt.whole(p.detach()).cpu().clone() for n, p in trainable.items()}  # FSDP: full_tensor


def load_trainable(s: Setup, tensors: dict[str, torch.Tensor], source: str = "checkpoint weights") -> None:
    params = dict(s.accelerator.unwrap_model(s.model).named_parameters())
    engine = s.engine
    with zero.gathered(engine, [p for n, p in params.items() if n in tensors], modify=True):
        missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        shapes = [
            f"{n}: {tuple(t.shape)} in the checkpoint, {tuple(params[n].shape)} in the model"
            for n, t in tensors.items()
            if n in params and t.shape != params[n].shape
        ]
        problems = [f"missing {n}" for n in missing] + [f"unexpected {n}" for n in unexpected] + shapes
        if problems:
            raise UserError(f"{source} do not match the model", problems[:10])
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(ckpt.like(params[name], value))
    if engine is not None:
        zero.weights_changed(engine)


def save_weights(s: Setup) -> Path | None:
    """The adapter (LoRA) or full model plus tokenizer, in the format plain peft/transformers load.
    Returns the directory on the main process, None elsewhere."""
    from tunesmith.training.processes import collective_forward, fsdp

    model, lora = s.accelerator.unwrap_model(s.model), s.cfg.peft.adapter
    # ZeRO-3 and FSDP hold a partition of each tensor: gather them whole (a collective, so on every rank).
    whole = None
    if collective_forward(s.accelerator):
        if lora:  # the adapter's tensors are the trainables
            whole = trainable_state(s)
        elif fsdp(s.accelerator):
            whole = {n: ckpt.whole(t.detach()).cpu().clone() for n, t in model.state_dict().items()}
        else:
            whole = s.accelerator.get_state_dict(s.model)
    if not s.accelerator.is_main_process:
        return None
    target = s.run / ("adapter" if lora else "model")
    model.save_pretrained(target, safe_serialization=True, **({"state_dict": whole} if whole else {}))
    s.tokenizer.save_pretrained(target)
    return target


def optimizer_of(s: Setup):
    """The optimizer whose state a checkpoint holds (a context): under DeepSpeed, this rank's partition."""
    return nullcontext(s.optim.optimizer) if s.engine is None else zero.base_optimizer(s.engine)


def partitioned(s: Setup) -> bool:
    """Each rank holds its own part of the optimizer state (DeepSpeed ZeRO, FSDP): each saves it."""
    from tunesmith.training.processes import sharded

    return s.accelerator.num_processes > 1 and sharded(s.accelerator)


def save_checkpoint(s: Setup, updates: int, data_step: int) -> None:
    with optimizer_of(s) as opt:
        opt_meta, opt_tensors = ckpt.optimizer_to_tensors(opt)
    rng_meta, rng_tensors = ckpt.rng_state()
    tensors = {
        "trainable.safetensors": trainable_state(s),
        "optimizer.safetensors": opt_tensors,
        "rng.safetensors": rng_tensors,
    }
    if s.books.best_weights is not None:
        tensors["best.safetensors"] = s.books.best_weights
    if s.books.average is not None:
        tensors["average.safetensors"] = s.books.average.state_dict()
    state = checkpoint_state(s, updates, data_step, opt_meta, rng_meta)
    root = s.run / "checkpoints"
    parts = rank_parts(s, root, updates, (rng_meta, rng_tensors), (opt_meta, opt_tensors))
    if s.accelerator.is_main_process:
        write_on_main(s, root, updates, tensors, state, parts)
    s.accelerator.wait_for_everyone()


def checkpoint_state(s: Setup, updates: int, data_step: int, opt_meta: dict, rng_meta: dict) -> dict:
    """state.json: counters, positions and every non-tensor state resume needs."""
    return {
        "step": updates,
        "data_step": data_step,
        "epoch": s.optim.plan.epoch_of(max(data_step - 1, 0)),
        "optimizer": opt_meta,
        "rng": rng_meta,
        "scheduler": {"last_epoch": s.optim.scheduler.last_epoch},
        "early_stopping": s.books.stopper.state_dict(),
        "counters": s.books.counters,
        "fingerprint": s.data.examples.fingerprint,
        "world_size": s.accelerator.num_processes,
        "grad_scaler": s.optim.precision.state_dict(),
        "spikes": s.books.spikes.state_dict(),
        "watch": s.books.watch.state_dict(),
        "micro_batch_size": s.optim.plan.micro_size,
        "privacy": s.optim.dp.state_dict() if s.optim.dp is not None else None,
    }


def rank_parts(s: Setup, root: Path, updates: int, rng: tuple, opt: tuple) -> Callable[[Path], None] | None:
    """Several ranks: each writes its own random streams into the main process's staging directory; only
    when all have (barrier) does the main process write the manifest and rename. Returns what the main
    process waits with between the two (None on one process); the other ranks write their parts here."""
    acc = s.accelerator
    if acc.num_processes == 1:
        return None

    def parts(staging: Path) -> None:
        acc.wait_for_everyone()  # staging exists
        acc.wait_for_everyone()  # every rank's part is written

    if not acc.is_main_process:
        (rng_meta, rng_tensors), (opt_meta, opt_tensors) = rng, opt
        acc.wait_for_everyone()
        staging, rank = ckpt.staging_dir(root, updates), acc.process_index
        ckpt.write_part(staging, {f"rng-rank{rank}.safetensors": rng_tensors}, rng_meta)
        if partitioned(s):  # ZeRO and FSDP partition the optimizer state: each rank saves its own
            ckpt.write_part(staging, {f"optimizer-rank{rank}.safetensors": opt_tensors}, opt_meta)
        acc.wait_for_everyone()
    return parts


def write_on_main(s: Setup, root: Path, updates: int, tensors: dict, state: dict, parts) -> None:
    """The main process writes the checkpoint (warning first when the disk runs low); a full disk halts the run."""
    warning = ckpt.low_space_warning(root, tensors)
    if warning:
        from tunesmith.console import console

        console.print(f"[yellow]warning: {warning}[/]")
        s.run.log({"step": updates, "warning": warning})
    try:
        ckpt.write_checkpoint(root, updates, tensors, state, s.cfg.train.save_total_limit, parts)
    except ckpt.DiskFull:
        try:
            s.run.update_run(status="halted", step=updates)
        except OSError:
            pass  # the disk is full: the error message matters more than the status line
        raise


def pick_checkpoint(root: Path, fallback: bool) -> Path | None:
    """The newest checkpoint that verifies; an older one only with --fallback, never silently."""
    candidates = list(reversed(ckpt.list_checkpoints(root)))
    ckpt.latest_checkpoint(root)  # removes staging leftovers of killed saves
    for path in candidates:
        try:
            ckpt.verify(path, REQUIRED)
            return path
        except UserError as err:
            if not fallback:
                raise UserError(
                    f"Refusing to resume: {err.title}",
                    err.problems,
                    hint="Resume with --fallback to use the previous checkpoint instead.",
                ) from None
            from tunesmith.console import console

            console.print(f"[yellow]skipping {path.name}: {err.title}[/]")
    return None


def restore(s: Setup, path: Path, allow_drift: bool = False) -> tuple[int, int]:
    state, tensors = ckpt.load_checkpoint(path, REQUIRED)
    check_resumable(s, path, state, allow_drift)
    if s.optim.dp is not None:  # epsilon continues from the checkpoint's accountant, or the resume is refused
        s.optim.dp.load_state_dict(state.get("privacy"), str(path))
    load_trainable(s, tensors["trainable.safetensors"], f"{path}/trainable.safetensors")
    restore_optimizer(s, path, state, tensors)
    restore_schedule(s, state)
    restore_books(s, state, tensors)
    rank = s.accelerator.process_index
    if rank == 0:
        ckpt.set_rng_state(state["rng"], tensors["rng.safetensors"])
    else:
        own = path / f"rng-rank{rank}.safetensors"
        ckpt.set_rng_state(ckpt.load_part_meta(own), tensors[own.name])
    return state["step"], state.get("data_step", state["step"])


def check_resumable(s: Setup, path: Path, state: dict, allow_drift: bool) -> None:
    """Refuse a checkpoint made from other data (unless --allow-drift, recorded), on another number of
    processes, or with privacy when this config has none."""
    if state["fingerprint"] != s.data.examples.fingerprint:
        problem = f"dataset fingerprint {state['fingerprint'][:12]} -> {s.data.examples.fingerprint[:12]}"
        if not allow_drift:
            raise UserError(
                f"Refusing to resume from {path}: the training/validation data changed",
                [problem],
                hint="Use --allow-drift to resume anyway (recorded in run.json).",
            )
        s.run.update_run(drift=s.run.read_json("run.json", {}).get("drift", []) + [problem])
    if state.get("world_size", 1) != s.accelerator.num_processes:
        raise UserError(
            f"Refusing to resume from {path}: saved with {state.get('world_size', 1)} processes, "
            f"now {s.accelerator.num_processes}",
            hint="Resume with the same number of processes.",
        )
    if s.optim.dp is None and state.get("privacy"):
        raise UserError(
            f"Refusing to resume from {path}: it was trained with privacy (DP-SGD), this config has none",
            hint="Resume with the original privacy block; a mix of private and non-private steps has no guarantee.",
        )


def restore_optimizer(s: Setup, path: Path, state: dict, tensors: dict) -> None:
    rank = s.accelerator.process_index
    with optimizer_of(s) as opt:
        if partitioned(s) and rank:  # this rank's partition, its metadata in the file's header
            own = path / f"optimizer-rank{rank}.safetensors"
            ckpt.optimizer_from_tensors(opt, ckpt.load_part_meta(own), tensors[own.name])
        else:
            ckpt.optimizer_from_tensors(opt, state["optimizer"], tensors["optimizer.safetensors"])


def restore_schedule(s: Setup, state: dict) -> None:
    # The rate comes from this config's schedule, not the checkpoint's param_groups: identical without
    # drift, and with --allow-drift a changed train.lr applies from the first resumed update.
    sched = s.optim.scheduler
    sched.last_epoch = state["scheduler"]["last_epoch"]
    for group, base, fn in zip(s.optim.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = base, base * fn(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in s.optim.optimizer.param_groups]


def restore_books(s: Setup, state: dict, tensors: dict) -> None:
    """What the loop carries between updates: early stopping, warnings, spikes, counters, the batch size."""
    s.books.stopper.load_state_dict(state["early_stopping"])
    s.books.watch.load_state_dict(state.get("watch"))  # absent in checkpoints written before it was saved
    s.books.best_weights = tensors.get("best.safetensors")
    if s.books.average is not None:
        s.books.average.load_state_dict(tensors.get("average.safetensors"))  # after the weights: None starts there
    s.books.counters = state["counters"]
    s.optim.precision.load_state_dict(state.get("grad_scaler"))  # None after a drift from fp32: a fresh scaler
    s.books.spikes.load_state_dict(state.get("spikes", {"history": [], "flagged": []}))
    s.optim.plan.micro_size = state.get("micro_batch_size", s.optim.plan.micro_size)  # keep an out-of-memory back-off
    s.books.excluded = set(s.run.read_json(EXCLUDED, {}).get("rows", []))


def rollback(s: Setup, rows: list[int], updates: int, data_step: int) -> tuple[int, int]:
    """Back to the last committed checkpoint, with `rows` (train indices) excluded from then on."""
    from tunesmith.console import console

    spikes = len(s.books.spikes.flagged)
    s.books.excluded |= set(rows)
    s.books.spike_rows.clear()
    s.run.write_json(EXCLUDED, {"rows": sorted(s.books.excluded)})
    latest = ckpt.latest_checkpoint(s.run / "checkpoints")
    if latest is None:
        console.print("[yellow]spikes: no checkpoint yet to roll back to; the rows are excluded from now on[/]")
        return updates, data_step
    rollbacks = s.books.counters.get("rollbacks", 0) + 1
    back_to, back_data = restore(s, latest)
    s.books.counters["rollbacks"] = rollbacks
    s.run.truncate_log(back_to, back_data)
    ids = [s.data.rows["train"][i].id for i in sorted(rows)]
    s.run.log({"step": back_to, "data_step": back_data, "rollback": latest.name, "excluded": ids})
    console.print(
        f"[yellow]{spikes} spikes within "
        f"{s.cfg.train.spike_window} steps: rolled back to {latest.name}; {len(ids)} rows excluded[/]"
    )
    return back_to, back_data
