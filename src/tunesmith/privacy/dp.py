"""DP-SGD with Opacus's parts, fitted to tunesmith's loop.

Per step: each micro-batch's backward leaves per-example gradients (GradSampleModule hooks); each is
clipped to C and summed (DPOptimizer.clip_and_accumulate); after the last micro-batch, Gaussian noise
of std sigma*C is added once (DPOptimizer.add_noise), the sum is divided by the *expected* batch q*N
(not the sampled one: that would leak the batch size), and the accountant records the step. The
optimizer step itself stays the loop's. Opacus's PrivacyEngine is not used because it owns the data
loader; tunesmith's Poisson plan is a pure function of the step, which keeps resume exact.

Ghost clipping (privacy.grad_sample_mode: ghost) never holds per-example gradients: a first backward of
the micro-batch's summed loss leaves each example's gradient *norm* (from each layer's inputs and output
gradients), and a second backward of sum_i c_i * loss_i, with c_i = min(1, C / norm_i), leaves the
clipped sum in .grad. The rest of the step (noise, scaling, accounting) is the same.

Several processes: every rank draws the same Poisson sample and clips its share of it; the clipped
sums are added across ranks (all-reduce) before the noise, which every rank draws from the same
per-step seed. So each rank holds the same noisy gradient, and the step equals the one-process step
on the same sample (up to summation order): one noise draw per step, as the accountant assumes.
"""

from __future__ import annotations

import math

import torch
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from tunesmith.config import Privacy
from tunesmith.errors import UserError

NOISE_SALT = 9_176_263


def check_model(model: torch.nn.Module, ghost: bool = False) -> None:
    """Refuse models whose per-example gradients would be wrong or missing, before any step."""
    problems = [str(e) for e in ModuleValidator.validate(model, strict=False) if "training mode" not in str(e)]
    if ghost:
        problems += tied_trainables(model)
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        trainable = [p.requires_grad for p in own]
        if any(trainable) and not all(trainable):  # Opacus #436: such layers get wrong per-example grads
            problems.append(f"{name or 'model'} ({type(module).__name__}) mixes frozen and trainable parameters")
    if not any(p.requires_grad for p in model.parameters()):
        problems.append("no trainable parameters")
    if problems:
        raise UserError(
            "This model cannot be trained with differential privacy",
            problems[:10],
            hint="BatchNorm has no per-example gradient: use a model with LayerNorm/RMSNorm, or "
            "freeze or unfreeze whole layers. Tied weights: grad_sample_mode: hooks, or LoRA.",
        )


def tied_trainables(model: torch.nn.Module) -> list[str]:
    """Trainable weights that two layers share (tied input and output embeddings): Opacus's ghost clipping
    takes a norm per layer, which is not the norm of the shared weight's gradient, and refuses them."""
    owner: dict[int, str] = {}
    tied = []
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad and owner.setdefault(id(p), name) != name:
                tied.append(f"{owner[id(p)]} and {name} share a trainable weight (grad_sample_mode: ghost)")
    return tied


def delta_for(pcfg: Privacy, n_units: int) -> float:
    """privacy.delta, or 1/(10 N) when unset; refused at 1/N or above."""
    delta = pcfg.delta if pcfg.delta is not None else 1 / (10 * n_units)
    if delta >= 1 / n_units:
        raise UserError(
            f"privacy.delta={pcfg.delta} is not below 1/N = {1 / n_units:.3g} (N = {n_units} privacy units)",
            hint="A delta of 1/N allows leaking one unit outright; "
            f"use at most 1/(10 N) = {1 / (10 * n_units):.3g}, or leave it unset.",
        )
    return delta


def per_sample_hooks(model: torch.nn.Module, pcfg: Privacy) -> torch.nn.Module:
    # The hooks go on the model's own layers, so the loop keeps calling the plain model.
    if pcfg.grad_sample_mode == "ghost":
        return GradSampleModuleFastGradientClipping(
            model,
            batch_first=True,
            loss_reduction="sum",
            max_grad_norm=pcfg.max_grad_norm,
            use_ghost_clipping=True,
        )
    return GradSampleModule(model, batch_first=True, loss_reduction="sum")


def noise_multiplier(pcfg: Privacy, delta: float, sample_rate: float, planned_steps: int) -> float:
    """privacy.noise_multiplier, or the one that spends target_epsilon in the planned steps."""
    if pcfg.noise_multiplier is not None:
        return pcfg.noise_multiplier
    return get_noise_multiplier(
        target_epsilon=pcfg.target_epsilon,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=planned_steps,
        accountant=pcfg.accountant,
    )


class DPSGD:
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        pcfg: Privacy,
        n_units: int,
        sample_rate: float,
        planned_steps: int,
        seed: int,
    ):
        self.cfg, self.n_units, self.sample_rate, self.seed = pcfg, n_units, sample_rate, seed
        self.delta = delta_for(pcfg, n_units)
        self.ghost = pcfg.grad_sample_mode == "ghost"
        check_model(model, self.ghost)
        self.generator = self._generator(model)  # before any hook: a refused secure_mode leaves the model as it was
        # A PEFT model loads in eval mode, and Opacus's hooks capture nothing there ("No activations
        # detected"): switch to training mode before wrapping.
        model.train()
        self.module = per_sample_hooks(model, pcfg)
        self.sigma = noise_multiplier(pcfg, self.delta, sample_rate, planned_steps)
        self.accountant = create_accountant(pcfg.accountant)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.sigma,
            max_grad_norm=pcfg.max_grad_norm,
            expected_batch_size=1,
            loss_reduction="sum",
            generator=self.generator,
            secure_mode=pcfg.secure_mode,
        )
        self._eps_cache: tuple[int, float] = (0, 0.0)
        self.budget_steps = (
            self._steps_within(pcfg.target_epsilon, 2 * planned_steps + 10) if pcfg.target_epsilon is not None else None
        )

    def _generator(self, model) -> torch.Generator:
        device = next(p for p in model.parameters()).device
        if not self.cfg.secure_mode:
            return torch.Generator(device=device)  # reseeded per step: reproducible, and resume-exact
        try:
            import torchcsprng as csprng  # noqa: PLC0415
        except ImportError:
            raise UserError(
                "privacy.secure_mode needs a cryptographically secure RNG (the torchcsprng package), "
                "which is not installed; refusing rather than using the ordinary generator"
            ) from None
        return csprng.create_random_device_generator("/dev/urandom")

    def share(self, model: torch.nn.Module) -> torch.nn.Module:
        """Several processes: start every rank from rank 0's trainable weights (fresh LoRA or heads)."""
        import torch.distributed as dist

        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)
        return model

    def close(self) -> None:
        """Remove the per-example hooks (the model trains or evaluates as a plain model again)."""
        self.module._close()

    # -- per step ------------------------------------------------------------------------------------
    def ghost_backward(self, losses: torch.Tensor) -> None:
        """Ghost clipping's two backwards over a micro-batch's per-example losses: the first for the
        per-example gradient norms, the second for the clipped sum sum_i c_i * grad_i."""
        if losses.dim() != 1:
            raise ValueError(f"ghost clipping needs one loss per example, got shape {tuple(losses.shape)}")
        losses.sum().backward(retain_graph=True)  # the hooks keep each example's norm, not its gradient
        coef = self.module.get_clipping_coef().detach()
        for p in self.optimizer.params:
            p.grad = None  # the unclipped sum of this pass is not used
        self.module.disable_hooks()  # the norms are known: the second pass needs no per-example work
        try:
            (coef.to(losses.dtype) * losses).sum().backward()
        finally:
            self.module.enable_hooks()

    def accumulate(self) -> None:
        """After a micro-batch's backward: add its clipped per-example gradients to the step's sum (hooks:
        clip each to C here; ghost: the second backward left the clipped sum in .grad)."""
        if not self.ghost:
            self.optimizer.clip_and_accumulate()
        for p in self.optimizer.params:
            if self.ghost and p.grad is not None:
                p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad + p.grad
            p.grad_sample, p.grad = None, None

    def privatize(self, step: int) -> float:
        """Noise the step's clipped sum, scale by the expected batch, and account for the step (taken even
        when Poisson sampling drew no rows). Returns the clipped sum's norm, before noise."""
        params = self.optimizer.params
        for p in params:
            if p.summed_grad is None:  # an empty step (on this rank): noise only
                p.summed_grad = torch.zeros_like(p)
        self._sum_across_ranks(params)
        clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.summed_grad) for p in params]))
        if not self.cfg.secure_mode:
            self.generator.manual_seed(self.seed * 1_000_003 + NOISE_SALT + step)
        self.optimizer.add_noise()
        expected = self.sample_rate * self.n_units
        for p in params:
            p.grad.div_(expected)
            p.summed_grad = None
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.sample_rate)
        return float(clipped)

    @staticmethod
    def _sum_across_ranks(params: list) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        flat = torch.cat([p.summed_grad.reshape(-1) for p in params])  # one collective, not one per tensor
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.summed_grad.numel()
            p.summed_grad.copy_(flat[offset : offset + n].view_as(p.summed_grad))
            offset += n

    def reset(self) -> None:
        """Drop a step's partial sums (the step restarts after an out-of-memory back-off), and what the
        hooks kept of a forward whose backward never ran: its activations would be taken for the next
        micro-batch's, and its forward count would read as a tied weight."""
        for p in self.optimizer.params:
            p.grad_sample, p.summed_grad, p._forward_counter = None, None, 0
            if hasattr(p, "_current_grad_sample"):  # Opacus tests for the attribute, not for None
                del p._current_grad_sample
        for module in self.module.modules():
            if hasattr(module, "activations"):
                module.activations = []
            if hasattr(module, "max_batch_len"):
                del module.max_batch_len

    # -- budget --------------------------------------------------------------------------------------
    @property
    def steps_taken(self) -> int:
        return sum(n for _, _, n in self.accountant.history)

    def epsilon(self, steps: int | None = None) -> float:
        steps = self.steps_taken if steps is None else steps
        if steps == 0:
            return 0.0
        if self.sigma == 0:
            return math.inf  # clipping without noise: no guarantee at all
        if self._eps_cache[0] != steps:
            acc = create_accountant(self.cfg.accountant)
            acc.history = [(self.sigma, self.sample_rate, steps)]
            self._eps_cache = (steps, float(acc.get_epsilon(delta=self.delta)))
        return self._eps_cache[1]

    def _steps_within(self, target: float, upper: int) -> int:
        """The most steps whose epsilon stays at or under `target` (epsilon grows with steps)."""
        lo, hi = 0, upper
        if self.epsilon(hi) <= target:
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.epsilon(mid) <= target else (lo, mid)
        return lo

    def budget_exhausted(self) -> bool:
        return self.budget_steps is not None and self.steps_taken >= self.budget_steps

    def summary(self) -> dict:
        eps = self.epsilon()
        return {
            "epsilon": round(eps, 6) if math.isfinite(eps) else None,
            "delta": self.delta,
            "noise_multiplier": self.sigma,
            "sample_rate": self.sample_rate,
            "steps": self.steps_taken,
            "max_grad_norm": self.cfg.max_grad_norm,
            "accountant": self.cfg.accountant,
            "unit": self.cfg.unit,
            "units": self.n_units,
            "target_epsilon": self.cfg.target_epsilon,
            "guarantee": f"{self.cfg.unit}-level ({eps:.3g}, {self.delta:.3g})-DP"
            if math.isfinite(eps)
            else "none: noise_multiplier is 0 (clipping only)",
        }

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "history": [list(h) for h in self.accountant.history],
            "noise_multiplier": self.sigma,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "accountant": self.cfg.accountant,
            "unit": self.cfg.unit,
            "max_grad_norm": self.cfg.max_grad_norm,
        }

    def load_state_dict(self, state: dict | None, source: str) -> None:
        """Continue the accountant. A checkpoint without one, or made with other noise, sampling rate,
        delta, accountant, unit or clipping norm would make the reported epsilon wrong: refuse it."""
        if state is None:
            raise UserError(
                f"Refusing to resume from {source}: it has no privacy accountant state",
                hint="The checkpoint was made without privacy; epsilon cannot be continued from it.",
            )
        mine = self.state_dict()
        differ = [
            f"{k}: {state.get(k)!r} in the checkpoint, {mine[k]!r} now"
            for k in mine
            if k != "history"
            and (
                state.get(k) != mine[k]
                if not isinstance(mine[k], float)
                else state.get(k) is None or abs(state[k] - mine[k]) > 1e-12 * max(1.0, abs(mine[k]))
            )
        ]
        if differ:
            raise UserError(
                f"Refusing to resume from {source}: the privacy settings changed",
                differ,
                hint="Epsilon composes only over identical steps; start a new run for new settings.",
            )
        self.accountant.history = [tuple(h) for h in state["history"]]
