#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (no network there). Prepared here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 datasets==5.2.0 \
#     dill==0.4.1 multiprocess==0.70.19 nltk==3.10.4 trl==1.16.0 pyarrow==26.0.1
#   .venv/bin/pip wheel --no-deps -w .whl rouge_score==0.1.2
#   .gpu/: alpaca.jsonl (800 rows of ../shared/data/alpaca_instructions/train.jsonl), peer_trl_sft.py,
#          tokenizer/ (SmolLM2's tokenizer files from the cached model)
# Runs: throughput (tunesmith vs peer, bf16, random-init SmolLM2-135M and a ~0.5B Llama), then a
# single-GPU training smoke run: torchrun with 1 process (DDP over nccl), then a resume through
# `accelerate launch`. Results land in $OUT.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .whl/*.whl | grep -v pyarrow) || exit 1
if ! python3 -c "import pyarrow, sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)"; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/pyarrow-*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TUNESMITH_TOKENIZER=$PWD/.gpu/tokenizer PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, accelerate, trl, datasets; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, \
'trl', trl.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/gpu.txt"
common=(--data .gpu/alpaca.jsonl --peer .gpu/peer_trl_sft.py --out "$OUT" --batch-size 8 --max-length 512)
if [ "${1:-all}" = "memory" ]; then  # second call: gradient checkpointing against the peer's best mode
  timeout 300 python3 benchmarks/throughput.py --random-init smollm2-135m --steps 20 --rounds 2 \
    --modes bf16-packed,bf16-packed-gc --peer-modes bf16-packing "${common[@]}" 2>&1 | tee "$OUT/throughput-135m-gc.log" \
    | grep -v "it/s\]"
  exit
fi
timeout 230 python3 benchmarks/throughput.py --random-init smollm2-135m --steps 20 --rounds 2 \
  --modes bf16-packed,bf16 --peer-modes bf16,bf16-packing "${common[@]}" 2>&1 | tee "$OUT/throughput-135m.log" | grep -v "it/s\]"
timeout 130 python3 benchmarks/throughput.py --random-init llama-0.5b --steps 20 --rounds 1 \
  --modes bf16-packed --peer-modes bf16,bf16-packing "${common[@]}" 2>&1 | tee "$OUT/throughput-05b.log" | grep -v "it/s\]"
# nccl smoke: a tiny random model, 20 steps with a checkpoint at 10, then a resume to 30.
python3 - <<'EOF'
import json, pathlib, torch
from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
p = pathlib.Path("/tmp/smoke"); p.mkdir(exist_ok=True)
LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=49152)).save_pretrained(p / "model")
AutoTokenizer.from_pretrained(".gpu/tokenizer").save_pretrained(p / "model")
(p / "c.yaml").write_text(json.dumps({"name": "smoke", "output_dir": str(p / "runs"), "model": {"name": str(p / "model")},
  "data": {"train": ".gpu/alpaca.jsonl", "format": "instruction", "max_length": 256, "overlength": "drop"},
  "train": {"max_steps": 20, "batch_size": 8, "precision": "bf16", "save_every": 10},
  "eval": {"before_after": False, "samples": 0, "max_rows": 16, "generate_rows": 4, "max_new_tokens": 8}}))
EOF
timeout 100 torchrun --nproc_per_node 1 -m tunesmith train /tmp/smoke/c.yaml \
  > "$OUT/ddp-smoke.log" 2>&1; echo "torchrun exit $?" | tee -a "$OUT/ddp-smoke.log"
timeout 50 accelerate launch --num_processes 1 -m tunesmith train /tmp/smoke/c.yaml --resume train.max_steps=30 \
  --allow-drift >> "$OUT/ddp-smoke.log" 2>&1; echo "resume exit $?" | tee -a "$OUT/ddp-smoke.log"
grep -E "Resumed|step 30/|Run directory" "$OUT/ddp-smoke.log" | tail -3
cp /tmp/smoke/runs/smoke/run.json "$OUT/smoke-run.json" 2>/dev/null
