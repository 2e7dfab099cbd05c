"""The live progress line: step/total, smoothed loss, lr, tokens/s, ETA."""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tunesmith.console import console


class TrainProgress:
    def __init__(self, total: int, start: int):
        self.smooth: float | None = None
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not sys.stderr.isatty(),
        )
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.started, self.start_step = time.monotonic(), start
        self.last_eval = ""
        self.epsilon = ""  # DP runs: the privacy spent so far

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def step(
        self, step: int, loss: float, lr: float, grad_norm: float, tokens_per_s: float, epsilon: float | None = None
    ) -> None:
        # An exponential average: single micro-batch losses are too noisy to read.
        self.smooth = loss if self.smooth is None else 0.7 * self.smooth + 0.3 * loss
        if epsilon is not None:
            self.epsilon = f"eps {epsilon:.3g} "
        info = (
            f"loss {self.smooth:.4f} lr {lr:.2e} gnorm {grad_norm:.2f} {self.epsilon}{tokens_per_s:,.0f} tok/s "
            f"{self.last_eval}"
        )
        self.progress.update(self.task, completed=step, info=info)
        total = self.progress.tasks[0].total or 1
        if self.progress.disable and (step % max(1, int(total) // 10) == 0 or step == total):
            # No live bar in logs: a line every ~10%, never wrapped, so each step stays one greppable line.
            console.print(f"step {step}/{int(total)}: {info}{self.eta(step, int(total))}", soft_wrap=True)

    def eta(self, step: int, total: int) -> str:
        """' eta 3m12s' from this session's pace (a resumed run's earlier steps took no time here)."""
        done = step - self.start_step
        if done <= 0 or step >= total:
            return ""
        left = (time.monotonic() - self.started) / done * (total - step)
        return f" eta {int(left // 60)}m{int(left % 60):02d}s"

    def eval(self, step: int, metrics: dict) -> None:
        shown = {
            k: v
            for k, v in metrics.items()
            if k in ("loss", "perplexity", "accuracy", "forgetting_ratio") and isinstance(v, float)
        }
        self.last_eval = "| val " + " ".join(f"{k} {v:.4g}" for k, v in shown.items())
        if self.progress.disable:
            console.print(
                f"step {step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()), soft_wrap=True
            )
