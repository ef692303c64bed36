#!/usr/bin/env bash
# The prepared GPU check (issue #11, item 4): install, then the demo, the step's throughput
# and one whole `shardmf train` on cuda, in under 5 minutes on one H200. bench/gpu_check.md
# says how to run it on a lent machine and what it prints.
#
#   bash bench/gpu_check.sh                  # on a GPU machine
#   DEVICE=cpu bash bench/gpu_check.sh --quick   # smoke test anywhere (small sizes)
#
# Environment (all optional):
#   DEVICE   cuda (default) | cpu
#   OUT      where the log and JSON go (default /tmp/shardmf-gpu-check)
#   WORK     scratch folder for data, shards and runs (default /tmp/shardmf-gpu-work)
#   PYTHON   the interpreter that holds torch (default python3)
#   VENV     the venv made over it with --system-site-packages (default /tmp/shardmf-gpu-venv)
#   WHEELS   folder of wheels for packages PYTHON lacks (default: .whl at the repo root, if any)
#   INSTALL  1 (default): venv + pip install; 0: use PYTHON as it is, from the source tree
set -euo pipefail

QUICK=0
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$arg'; expected --quick or --help" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/shardmf-gpu-check}
WORK=${WORK:-/tmp/shardmf-gpu-work}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/shardmf-gpu-venv}
INSTALL=${INSTALL:-1}
if [[ -z "${WHEELS:-}" && -d "$REPO/.whl" ]]; then WHEELS="$REPO/.whl"; fi
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: DEVICE=$DEVICE; expected cuda or cpu" >&2; exit 2 ;; esac

# Sizes. Full: the demo's own synthetic set and a 5M-rating set; quick: small enough for a
# 2-core CPU in about a minute.
if (( QUICK )); then
    DEMO_SYNTH=(--num-users 2000 --num-items 400 --num-ratings 60000)
    DEMO_TRAIN=(--epochs 3 --clusters 6)
    BIG_SYNTH=(--num-users 20000 --num-items 2000 --num-ratings 200000)
    BIG_BATCH=16384
    THROUGHPUT=(--quick)
else
    DEMO_SYNTH=()  # SynthConfig's defaults, as `shardmf demo` uses
    DEMO_TRAIN=(--epochs 12)
    BIG_SYNTH=(--num-users 100000 --num-items 20000 --num-ratings 5000000)
    BIG_BATCH=262144
    THROUGHPUT=()
fi

mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
CURRENT_PHASE=setup
trap 'echo "gpu_check: FAILED in phase $CURRENT_PHASE (exit $?); the log is $LOG" >&2' ERR

# WORK is replaced on every run, but only when this script made it (its marker is there).
MARKER=.shardmf-gpu-check
if [[ -e "$WORK" && ! -e "$WORK/$MARKER" && -n "$(ls -A "$WORK")" ]]; then
    echo "gpu_check: WORK=$WORK holds files this script did not write; choose another WORK" >&2
    exit 2
fi
rm -rf "$WORK"
mkdir -p "$WORK"
touch "$WORK/$MARKER"
PHASES="$WORK/phases.tsv"  # (OUT stays within the 8 files a device call brings back)

now() { date +%s.%N; }
run_phase() {  # run_phase NAME COMMAND...: run one phase, record its seconds
    CURRENT_PHASE=$1
    shift
    echo
    echo "=== $CURRENT_PHASE"
    local started
    started=$(now)
    "$@"
    awk -v name="$CURRENT_PHASE" -v a="$started" -v b="$(now)" \
        'BEGIN { printf "%s\t%.1f\n", name, b - a }' >>"$PHASES"
}

install() {
    if [[ "$INSTALL" == 0 ]]; then
        PY=$PYTHON
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        echo "INSTALL=0: $PY from the source tree (PYTHONPATH=$REPO)"
    else
        # --system-site-packages keeps the machine's CUDA build of torch.
        if [[ ! -x "$VENV/bin/python" ]]; then
            "$PYTHON" -m venv --system-site-packages "$VENV"
            # When PYTHON is itself a venv (the H200's python3 is /opt/torch/.venv/bin/python3),
            # the new venv's "system" packages are the base interpreter's, not PYTHON's, and
            # torch is missing. A .pth line adds PYTHON's site-packages behind the venv's own.
            "$PYTHON" -c 'import site, sys
if sys.prefix != sys.base_prefix:
    print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
                >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/shardmf_parent_site.pth"
        fi
        PY=$VENV/bin/python
        # The project's dependencies except torch; those the machine has are left alone.
        mapfile -t deps < <("$PY" -c 'import re, tomllib
for d in tomllib.load(open("'"$REPO"'/pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"torch\b", d) is None: print(d)')
        if [[ -n "${WHEELS:-}" ]]; then
            "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${deps[@]}"
        else
            "$PY" -m pip install -q "${deps[@]}"
        fi
        # pyproject needs setuptools>=77 to build; without it (no index to fetch one), the
        # package runs from the source tree instead.
        if "$PY" -c 'import setuptools, sys
sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null \
           && "$PY" -m pip install -q --no-deps --no-build-isolation -e "$REPO"; then
            echo "installed shardmf (editable) into $VENV"
        else
            export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
            echo "setuptools>=77 missing or the editable install failed: running from $REPO"
        fi
    fi
    "$PY" -c 'import dask, distributed, torch, data_shards, trainer, launch
print(f"dask {dask.__version__}, distributed {distributed.__version__}, torch {torch.__version__}")
print(f"shardmf from {trainer.__file__}")'
}

environment() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi | tee "$OUT/nvidia-smi.txt"
    elif [[ "$DEVICE" == cuda ]]; then
        echo "gpu_check: nvidia-smi not found" >&2
    fi
    "$PY" -c 'import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0), "nccl", torch.cuda.nccl.version())
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: DEVICE=cuda, but torch sees no CUDA device; use DEVICE=cpu")' "$DEVICE"
}

shardmf() { "$PY" -m launch.cli "$@"; }

# `shardmf demo` has no --device flag and starts 2 ranks (one GPU has 1): its steps, with
# its settings (launch/cli.py _demo), on one rank with --device given.
demo() {
    shardmf synth --out "$WORK/demo/raw" "${DEMO_SYNTH[@]}"
    shardmf prepare "$WORK/demo/raw" --out "$WORK/demo/shards"
    shardmf train "$WORK/demo/shards" --out "$WORK/demo/run" --device "$DEVICE" --nproc 1 \
        --dim 64 --init-std 0.1 --batch-size 4096 --lr 0.01 "${DEMO_TRAIN[@]}"
    cp "$WORK/demo/run/metrics.json" "$OUT/demo-metrics.json"
}

throughput() {
    "$PY" "$REPO/bench/gpu_throughput.py" --device "$DEVICE" "${THROUGHPUT[@]}" \
        --json-out "$OUT/gpu_throughput.json"
}

# The whole pipeline through torchrun (one rank), a large batch, no clustering. The learning
# rate times the batch is held at 3 (as in gpu_throughput.py): the summed loss of a large
# batch diverges at the default rate. This run measures speed, not accuracy.
pipeline() {
    shardmf synth --out "$WORK/big/raw" "${BIG_SYNTH[@]}"
    shardmf prepare "$WORK/big/raw" --out "$WORK/big/shards"
    OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc-per-node=1 \
        -m trainer "$WORK/big/shards" --out "$WORK/big/run" --device "$DEVICE" \
        --batch-size "$BIG_BATCH" --lr "$(awk -v b="$BIG_BATCH" 'BEGIN { printf "%.3g", 3 / b }')" \
        --dim 64 --epochs 5 --patience 0 --clusters 0
    cp "$WORK/big/run/metrics.json" "$OUT/pipeline-metrics.json"
    cp "$WORK/big/run/config.json" "$OUT/pipeline-config.json"
}

# Two ranks exchange rows the way resolve_strategy chooses on every backend: the packed,
# periodic exchange in dense float buffers (nccl on GPUs; never DDP's whole-table
# all-reduce). Needs one GPU per rank: with fewer it records why it was skipped.
two_ranks() {
    local devices=2
    if [[ "$DEVICE" == cuda ]]; then
        devices=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
    fi
    if (( devices < 2 )); then
        echo "{\"skipped\": \"$devices CUDA device(s); two nccl ranks need two\"}" \
            > "$OUT/two-ranks-metrics.json"
        return
    fi
    shardmf prepare "$WORK/big/raw" --out "$WORK/big/shards-by-user" --partition-by user \
        --num-shards 4
    shardmf train "$WORK/big/shards-by-user" --out "$WORK/big/run2" --device "$DEVICE" \
        --nproc 2 --batch-size "$BIG_BATCH" \
        --lr "$(awk -v b="$BIG_BATCH" 'BEGIN { printf "%.3g", 3 / b }')" \
        --dim 64 --epochs 5 --patience 0 --clusters 0
    "$PY" - "$WORK/big/run2" "$OUT/two-ranks-metrics.json" <<'PYTHON'
import json, sys
from pathlib import Path

run, out = Path(sys.argv[1]), Path(sys.argv[2])
metrics = json.loads((run / "metrics.json").read_text())
config = json.loads((run / "config.json").read_text())
epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
out.write_text(json.dumps({
    **{k: metrics[k] for k in ("train_ratings_per_s", "train_seconds", "test_rmse",
                               "world_size")},
    **{k: config[k] for k in ("backend", "sync", "sync_every", "user_embeddings", "gradients",
                              "step")},
    "sync_bytes_per_step": [e.get("sync_bytes_per_step") for e in epochs],
}, indent=2) + "\n")
PYTHON
}

summary() {
    "$PY" - "$OUT" "$DEVICE" "$QUICK" "$WORK" <<'PYTHON'
import json, sys
from pathlib import Path

out, device, quick, work = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", Path(sys.argv[4])
phases = dict(line.split("\t") for line in (work / "phases.tsv").read_text().splitlines())
demo = json.loads((out / "demo-metrics.json").read_text())
clusters = json.loads((work / "demo/run/clusters.json").read_text())
nmi = (clusters.get("scores", {}).get("nmi") or {}).get("score")
kernel = json.loads((out / "gpu_throughput.json").read_text())
whole = json.loads((out / "pipeline-metrics.json").read_text())
config = json.loads((out / "pipeline-config.json").read_text())
two = json.loads((out / "two-ranks-metrics.json").read_text())
summary = {
    "device": device, "quick": quick, "gpu": kernel.get("gpu"), "torch": kernel["torch"],
    "cuda": kernel["cuda"], "phase_seconds": {k: float(v) for k, v in phases.items()},
    "demo": {k: demo[k] for k in ("test_rmse", "baseline_test_rmse", "train_ratings_per_s",
                                  "train_seconds", "epochs")} | {"nmi": nmi},
    "kernel": kernel["best"] | {"target_ratings_per_s": kernel["target_ratings_per_s"],
                                "target_met": kernel["target_met"]},
    "pipeline": {k: whole[k] for k in ("train_ratings", "train_ratings_per_s", "train_seconds",
                                       "epochs", "test_rmse", "world_size")}
                | {k: config[k] for k in ("device", "backend", "rank_batch_size", "gradients",
                                          "sync")},
    "two_ranks": two,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
rows = [
    ("device", f"{device}{' (' + summary['gpu'] + ')' if summary['gpu'] else ''}, torch "
               f"{summary['torch']}, CUDA {summary['cuda']}"),
    *((f"phase {name}", f"{float(s):.1f} s") for name, s in phases.items()),
    ("demo test RMSE", f"{demo['test_rmse']:.4f} (bias-only {demo['baseline_test_rmse']:.4f}), "
                       f"NMI {nmi if nmi is None else round(nmi, 3)}"),
    ("demo train ratings/s", f"{demo['train_ratings_per_s'] / 1e6:.2f} M"),
    ("step, best M ratings/s", f"{kernel['best']['ratings_per_s'] / 1e6:.1f} "
                               f"({kernel['best']['mode']}, batch {kernel['best']['batch_size']:,})"
                               f"; target >= 100 met: {kernel['target_met']}"),
    ("pipeline train ratings/s", f"{whole['train_ratings_per_s'] / 1e6:.2f} M (batch "
                                 f"{config['rank_batch_size']:,}, {whole['train_ratings']:,} "
                                 f"ratings, {whole['epochs']} epochs)"),
    ("pipeline device/backend", f"{config['device']} / {config['backend']} "
                                f"(None: one rank has no process group)"),
    ("two ranks", two.get("skipped") or (
        f"{two['backend']}, sync {two['sync']} every {two['sync_every']} steps, users "
        f"{two['user_embeddings']}: {two['train_ratings_per_s'] / 1e6:.2f} M ratings/s, "
        f"test RMSE {two['test_rmse']:.4f}")),
]
print("\n=== summary" + (" (--quick: smoke-test sizes)" if quick else ""))
for name, value in rows:
    print(f"{name:<26} {value}")
print(f"\nlog, JSON: {out}")
PYTHON
}

echo "gpu_check: DEVICE=$DEVICE quick=$QUICK OUT=$OUT WORK=$WORK $(date -u +%FT%TZ)"
run_phase install install
run_phase environment environment
run_phase demo demo
run_phase throughput throughput
run_phase pipeline pipeline
run_phase two_ranks two_ranks
CURRENT_PHASE=summary
summary
exec >&- 2>&-
wait "$TEE_PID"  # the log is complete when the script returns
