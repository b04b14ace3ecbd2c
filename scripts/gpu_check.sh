#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short script (about 6 minutes on one H100/H200):
# the training and generation benchmarks on the GPU, then a 2-minute `minigpt fit` with bf16-mixed
# and torch.compile, and an evaluation of its checkpoint. Results go to $OUT (default ./gpu_check), and
# one JSON summary of all of them to $OUT/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
export MINIGPT_CACHE="${MINIGPT_CACHE:-$OUT/cache}"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$OUT/device.txt"
python scripts/bench_train.py --json 2>&1 | tee "$OUT/bench_train.txt"
python scripts/bench_generate.py --json 2>&1 | tee "$OUT/bench_generate.txt"
minigpt fit --config configs/imdb.yaml --trainer.precision bf16-mixed --model.compile true \
    --trainer.max_time 00:00:02:00 --trainer.enable_progress_bar false --trainer.default_root_dir "$OUT" \
    2>&1 | tee "$OUT/fit.txt"
# The run lives under --trainer.default_root_dir: $OUT/lightning_logs/version_N.
minigpt evaluate --ckpt_path "$(ls -t "$OUT"/lightning_logs/version_*/checkpoints/last.ckpt | head -1)" --split val \
    --json >"$OUT/evaluate.json" 2>"$OUT/evaluate.txt"
cat "$OUT/evaluate.txt" "$OUT/evaluate.json"
# One JSON summary: the last line of each benchmark's --json output, the evaluation, the device.
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
last_json = lambda f: json.loads((out / f).read_text().strip().splitlines()[-1])  # noqa: E731
summary = {
    "device": (out / "device.txt").read_text().strip(),
    "bench_train": last_json("bench_train.txt"),
    "bench_generate": last_json("bench_generate.txt"),
    "fit_bf16_compile_2min_evaluate_val": last_json("evaluate.json"),
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(f"summary: {out / 'summary.json'}")
PY
