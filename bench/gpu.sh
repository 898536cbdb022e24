#!/usr/bin/env bash
# The GPU benchmark session in one command: attention kernels, the GPT-2 small training step (Lightning and a
# plain loop, compile on/off, two batch sizes, a kernel profile, SDPA backends, the chunked loss) and KV-cache
# decoding.
#
#   bash bench/gpu.sh            # on one H100/H200: about 6 minutes, at most 8 (each bench has a deadline)
#   bash bench/gpu.sh --small    # tiny sizes on a CPU in a couple of minutes (automatic without a GPU)
#
# Each bench's output goes to ${OUT:-/tmp/gptmini-bench}/<name>.txt; its last line (JSON) is collected into
# summary.json, and a combined table and one JSON line end the output. Set GPU_BENCH_AUTOTUNE=1 to add a
# compile mode=max-autotune run (several more minutes of compilation).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT_DIR=${OUT:-/tmp/gptmini-bench}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json  # this run's results only
START=$(date +%s)
DEADLINE=$((START + ${GPU_BENCH_SECONDS:-450}))  # leaves a margin under 8 minutes

SMALL=0
[ "${1:-}" = "--small" ] && SMALL=1
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    [ $SMALL = 1 ] || echo "no CUDA device: running the small CPU mode"
    SMALL=1
fi

echo "== gptmini GPU bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), output in $OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "GPU: none"
$PY -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'lightning', lightning.__version__)"

left() { echo $((DEADLINE - $(date +%s))); }

# run NAME SECONDS CMD...: run one bench with a deadline, keep its output, report how it ended.
run() {
    local name=$1 limit=$2
    shift 2
    local budget
    budget=$(left)
    [ "$limit" -gt "$budget" ] && limit=$budget
    if [ "$limit" -le 10 ]; then
        echo "-- $name: skipped (time budget spent)"
        echo "{\"skipped\": \"time budget spent\"}" > "$OUT_DIR/$name.json"
        return
    fi
    echo "-- $name (at most ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT_DIR/$name.txt" 2> "$OUT_DIR/$name.err"
    local rc=$?
    sed '$d' "$OUT_DIR/$name.txt"  # the table; the JSON line goes to the summary
    if [ $rc = 0 ]; then
        tail -n 1 "$OUT_DIR/$name.txt" > "$OUT_DIR/$name.json"
    else
        echo "   exit $rc (124 = deadline); stderr tail:"
        tail -n 5 "$OUT_DIR/$name.err" | sed 's/^/   /'
        echo "{\"error\": \"exit $rc\"}" > "$OUT_DIR/$name.json"
    fi
    echo "   ($(( $(date +%s) - t0 ))s)"
}

if [ $SMALL = 1 ]; then
    run attention 120 $PY bench/attention.py --small --device cpu --batch 1 --seq 64 --embd 64 --heads 2 \
        --warmup 1 --repeats 3
    # The plumbing of every part, not figures: one batch size and a few steps each.
    run train_gpt2 240 $PY bench/train.py --gpt2 --small --device cpu --threads 1 --batches 1 \
        --compile off --steps 2 --warmup 1 --time-budget 150
    run train_sdpa_math 120 $PY bench/train.py --gpt2 --small --device cpu --threads 1 --batches 1 \
        --compile off --steps 2 --warmup 1 --loops plain --sdpa-backend math
    run train_standard_loss 120 $PY bench/train.py --gpt2 --small --device cpu --threads 1 --batches 1 \
        --compile off --steps 2 --warmup 1 --loops plain --loss standard
    run profile_step 60 $PY bench/profile_step.py --small --device cpu --compile off --steps 1 \
        --profile-steps 1 --top 5
    run generate 120 $PY bench/generate.py --device cpu --skip-gpt2 --default-shape 2 2 64 64 256 \
        --new-tokens 16 --prompt-tokens 4 --repeats 1 --compile off
else
    # Headline first: GPT-2 small at B=32 (nanoGPT's reference batch), Lightning vs plain, compiled and eager;
    # then B=16 if time allows.
    run train_gpt2 240 $PY bench/train.py --gpt2 --batches 32,16 --compile both --time-budget 150
    # Where the compiled B=32 step spends its time (kernel table and shares by kind).
    run profile_step 90 $PY bench/profile_step.py --batch 32 --compile on
    # The standard loss (forward's full logits) against the chunked one train.py uses (the rows above):
    # time and peak memory at B=32, compiled.
    run train_standard_loss 90 $PY bench/train.py --gpt2 --batches 32 --compile on --loops plain \
        --loss standard --steps 20
    # SDPA backends forced one at a time (plain loop, eager, B=16): which kernel Hopper should use.
    for backend in cudnn flash; do
        run "train_sdpa_$backend" 30 $PY bench/train.py --gpt2 --batches 16 --compile off --loops plain \
            --sdpa-backend "$backend" --steps 20
    done
    run generate 45 $PY bench/generate.py --device cuda --repeats 3
    run attention 45 $PY bench/attention.py
    if [ "${GPU_BENCH_AUTOTUNE:-0}" = 1 ]; then
        run train_autotune 400 $PY bench/train.py --gpt2 --batches 32 --compile on --loops plain \
            --compile-mode max-autotune-no-cudagraphs
    fi
fi

# The combined table and one JSON line with every bench's final JSON line.
$PY - "$OUT_DIR" "$SMALL" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
from pathlib import Path

out, small, wall = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
paths = [p for p in sorted(out.glob("*.json")) if p.stem != "summary"]
results = {p.stem: json.loads(p.read_text() or "{}") for p in paths}
print(f"\n== combined ({'small CPU mode' if small else 'GPU'}, {wall}s)")
print(f"{'bench':<20} {'setting':<34} {'loop':<9} {'ms/step':>8} {'tokens/s':>10} {'MFU':>6} {'peak MB':>8} "
      f"{'1st s':>6} {'L/plain':>7}")
for name, r in results.items():
    if not name.startswith("train"):
        continue
    if "results" not in r:
        print(f"{name:<20} {r}")
        continue
    for row in r["results"]:
        for loop in row.get("loops", []):
            if loop not in row:
                print(f"{name:<20} {row['setting']:<34} {row.get('skipped', 'missing')}")
                break
            s = row[loop]
            mfu = "n/a" if s["mfu"] is None else f"{s['mfu']:.1%}"
            ratio = row.get("lightning_over_plain") if loop == "lightning" else None
            ratio = "" if ratio is None else f"{ratio:.3f}"
            print(f"{name:<20} {row['setting']:<34} {loop:<9} {s['ms_per_step_median']:>8.1f} "
                  f"{s['tokens_per_s']:>10,.0f} {mfu:>6} {s['peak_mem_mb']:>8.0f} {s['first_step_s']:>6.1f} "
                  f"{ratio:>7}")
att = results.get("attention", {})
for variant, r in att.get("results", {}).items():
    print(f"{'attention':<20} {variant:<34} fwd {r['forward_ms']:.2f} ms, "
          f"fwd+bwd {r['forward_backward_ms']:.2f} ms")
for r in results.get("generate", {}).get("results", []):
    print(f"{'generate':<20} {r['model']:<34} cache {r['cache_tok_s']:.0f} tok/s, no cache "
          f"{r['no_cache_tok_s']:.0f} tok/s ({r['speedup']:.1f}x)")
summary = {"bench": "gpu", "small": small, "wall_s": wall, "results": results}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
EOF
