"""Candidate decoding (eval.decoding): n candidates per prompt, by sampling or beam search, and one kept.

Which one: with rerank: coverage, the candidate using most of the row's concepts by the coverage
metric's own rule (metrics.concept_hits, inflections included); ties, and rerank: score, go to the
highest score, then to the first candidate. A sampled candidate's score is the mean log-probability of
its generated tokens, EOS included, under the model's own distribution (before temperature and top_p).
Beam search returns its beams best first by that same length-normalised sum (length_penalty 1), so a
beam's score is minus its rank and no second pass is needed.

Sampling draws from the run's seed inside a forked random state: the same prompts in the same batches give
the same outputs, and the training run's random streams are not moved by an evaluation.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tunesmith.config.decoding import Decoding
from tunesmith.evaluation.metrics import concept_hits

GREEDY = Decoding()


class MeanLogProb(LogitsProcessor):
    """Each sequence's summed log-probability of the tokens it picks, up to its first EOS. transformers runs
    custom processors before the sampling warpers, so these are the model's own scores. A pick is known
    one step after its scores: each call scores the previous step's pick, finish() the last one."""

    def __init__(self, eos: int):
        self.eos, self.last = eos, None
        self.total = self.count = self.done = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.last is not None:
            self._add(input_ids[:, -1])
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _add(self, picked: torch.Tensor) -> None:
        if self.done is None:
            self.done = torch.zeros_like(picked, dtype=torch.bool)
            self.total = torch.zeros_like(picked, dtype=torch.float32)
            self.count = torch.zeros_like(picked)
        live = ~self.done  # after EOS, generate pads: those tokens are not the candidate's
        self.total += torch.where(live, self.last.gather(1, picked[:, None])[:, 0], 0.0)
        self.count += live.long()
        self.done |= picked == self.eos

    def finish(self, sequences: torch.Tensor) -> list[float]:
        """The mean per sequence, once generate() has returned `sequences` (their last column: the last pick)."""
        self._add(sequences[:, -1])
        return (self.total / self.count.clamp(min=1)).tolist()


def candidates(
    model, tokenizer, batch: dict, max_new_tokens: int, decoding: Decoding, synced: bool = False, streamer=None
) -> tuple[list[list[str]], list[list[float]], list[list[bool]]]:
    """For each prompt of the left-padded `batch`: its candidates' texts, scores, and whether each ended
    with EOS before the length limit (one list per prompt, num_candidates long). `streamer` (one prompt,
    one candidate): transformers' streamer, fed each token as it is generated."""
    n, eos = decoding.num_candidates, tokenizer.eos_token_id
    options: dict = {"do_sample": decoding.do_sample, "num_beams": decoding.num_beams, "num_return_sequences": n}
    if decoding.do_sample:  # top_k 0: transformers' default top-k cut of 50 would act behind top_p's back
        options.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=0)
    if decoding.num_beams > 1:
        options["length_penalty"] = 1.0
    if streamer is not None:
        options["streamer"] = streamer
    scorer = MeanLogProb(eos) if decoding.do_sample and n > 1 else None
    if scorer is not None:
        options["logits_processor"] = LogitsProcessorList([scorer])
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        synced_gpus=synced,
        **options,
    )
    new = out[:, batch["input_ids"].shape[1] :]  # num_return_sequences keeps each prompt's candidates together
    texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    stopped = (new == eos).any(dim=1).tolist()
    scores = scorer.finish(out) if scorer is not None else [-float(j % n) for j in range(len(texts))]
    return [[xs[k : k + n] for k in range(0, len(texts), n)] for xs in (texts, scores, stopped)]


def pick(texts: list[str], scores: list[float], concepts: list[str] | None = None) -> int:
    """The index of the kept candidate: most of `concepts` used (when given), then highest score, then first."""

    def rank(j: int) -> tuple:
        return sum(concept_hits(texts[j], concepts)) if concepts is not None else 0, scores[j], -j

    return max(range(len(texts)), key=rank)


@contextlib.contextmanager
def seeded(decoding: Decoding, seed: int, device):
    """Sampling from `seed`, the caller's random state restored afterwards (CPU, and the CUDA device in use)."""
    if not decoding.do_sample:
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def options(cfg, rows: list) -> dict:
    """generate()'s decoding arguments for a run's `rows`: none for the default greedy decoding."""
    d = cfg.eval.decoding
    if d.plain:
        return {}
    return {"decoding": d, "seed": cfg.seed, "concepts": [ex.concepts or [] for ex in rows]}


def record(cfg) -> dict:
    """What eval.json says produced a split's outputs."""
    return {**cfg.eval.decoding.model_dump(), "seed": cfg.seed}
