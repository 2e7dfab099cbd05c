"""K5 fault-free repeats: N two-rank (gloo) runs, each saving 3 checkpoints; every checkpoint must be
committed with both ranks' parts and verify, and every run must end with the same weights.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/k5_repeats.py [--repeats 25]

A race between the ranks (a commit before a rank's part is written, a part written into a renamed
directory) shows up as a missing rng-rank1 file, a failed verify, or differing weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(ROOT / "src"))

from _harness import adapter, fixtures, rel_config, write_config  # noqa: E402
from test_distributed import torchrun  # noqa: E402

from tunesmith.recipes.state import REQUIRED  # noqa: E402
from tunesmith.training import checkpoint as ckpt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=25)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="k5-"))
    model = fixtures.build_tiny_llama(tmp / "model")
    cfg_dict = rel_config(
        tmp, model, n_rows=57, max_steps=6, save_every=2, grad_accum=1, batch_size=4, save_total_limit=3
    )
    cfg = write_config(tmp, cfg_dict)
    failures, reference, start = [], None, time.time()
    for k in range(a.repeats):
        res = torchrun(tmp, "train", cfg, f"name=r{k}")
        run = tmp / "runs" / f"r{k}"
        problems = [] if res.returncode == 0 else [f"exit {res.returncode}"]
        for step in (2, 4, 6):
            try:
                ckpt.verify(run / "checkpoints" / f"step-{step}", (*REQUIRED, "rng-rank1.safetensors"))
            except Exception as err:  # noqa: BLE001 - any failure is a finding to report
                problems.append(f"step-{step}: {err}")
        if not problems:
            weights = adapter(run)
            reference = reference or weights
            if any(not (weights[n] == reference[n]).all() for n in weights):
                problems.append("final weights differ from repeat 0")
        failures += [f"repeat {k}: {p}" for p in problems]
        print(f"repeat {k}: {'ok' if not problems else problems}", flush=True)
    print(
        f"{a.repeats - len({f.split(':')[0] for f in failures})}/{a.repeats} fault-free 2-rank runs committed "
        f"every checkpoint with both ranks' parts and identical weights ({time.time() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
