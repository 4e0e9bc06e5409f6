#!/usr/bin/env bash
# seqpar's one-shot GPU check: tests, block kernels, merge, ring emulation, ring memory,
# torch.compile. Needs only python3 with torch (+ triton, pytest, hypothesis, einops) and
# this checkout; stops by itself within about 9 minutes. See bench/gpu/README.md.
#
#   bash bench/gpu/run.sh                 # on a CUDA machine
#   bash bench/gpu/run.sh --dry-run       # the same plumbing on the cpu, tiny sizes (< 1 min)
#
# Options:
#   --out DIR          where results go (default: $OUT if set, else bench/out/gpu-DATE-TIME)
#   --dry-run          cpu, tiny sizes, Triton's interpreter, the steps side by side; CUDA-only
#                      measurements are skipped
#   --only a,b         run only these steps (machine tests kernels merge ring memory compile)
#   --time-scale X     multiply every step's budget and the total (e.g. 2 on your own GPU)
#   --budget s=S,..    set step s's budget to S seconds (before --time-scale), e.g. kernels=300
#   --serial           run the dry run's steps one after another, as on a GPU
#   --pack             leave only summary.md, summary.json and results.tar.gz in DIR
#                      (the lent-GPU tool returns at most 8 files)
# Env: PYTHON (default python3), SEQPAR_GPU_TEST_WORKERS (pytest-xdist workers, default 6).
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DRY=0 OUTDIR="" ONLY="" SCALE=1 PACK=0 SERIAL=0 BUDGETS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUTDIR=${2:?--out needs a directory}; shift ;;
        --out=*) OUTDIR=${1#--out=} ;;
        --only) ONLY=${2:?--only needs step names}; shift ;;
        --only=*) ONLY=${1#--only=} ;;
        --time-scale) SCALE=${2:?--time-scale needs a number}; shift ;;
        --time-scale=*) SCALE=${1#--time-scale=} ;;
        --budget) BUDGETS=${2:?--budget needs step=seconds}; shift ;;
        --budget=*) BUDGETS=${1#--budget=} ;;
        --serial) SERIAL=1 ;;
        --pack) PACK=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
    esac
    shift
done

PY=${PYTHON:-python3}
if [ -z "$OUTDIR" ]; then
    OUTDIR=${OUT:-$ROOT/bench/out/gpu-$(date +%Y%m%d-%H%M%S)}
fi
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
rm -f "$OUTDIR/steps.tsv"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DRYFLAG=""
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DRYFLAG="--dry-run"
fi

# seconds per step, and for all steps together (the summary and packing come after)
if [ "$DRY" = 1 ]; then
    # side by side on shared cores each step takes several times its CPU seconds (3-6 s each)
    STEP_BUDGETS="machine:90 tests:90 kernels:90 merge:90 ring:90 memory:90 compile:90"
    TOTAL=150
else
    STEP_BUDGETS="machine:25 tests:140 kernels:160 merge:25 ring:50 memory:40 compile:60"
    TOTAL=500
fi
scale() { awk -v a="$1" -v s="$SCALE" 'BEGIN { printf "%d", a * s }'; }
TOTAL=$(scale $TOTAL)
now_ms() { date +%s%3N; }
START=$(now_ms)

run_step() {  # name, budget: one step under its hard timeout; its exit code and wall time to steps.tsv
    local step=$1 budget=$2 t0 rc wall
    t0=$(now_ms)
    timeout -k 5 "$budget" "$PY" "$ROOT/bench/gpu/steps.py" "$step" --out "$OUTDIR" --budget "$budget" $DRYFLAG \
        > "$OUTDIR/$step.log" 2>&1
    rc=$?
    wall=$(awk -v a="$t0" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
    printf '%s\t%s\t%s\t%s\n' "$step" "$rc" "$wall" "$budget" >> "$OUTDIR/steps.tsv"
    echo "[gpu] $step: exit $rc in $wall s; $(tail -n 1 "$OUTDIR/$step.log" | cut -c1-200)"
}

echo "[gpu] seqpar GPU check$([ "$DRY" = 1 ] && echo ' (dry run: steps run side by side)'): results in $OUTDIR"
for entry in $STEP_BUDGETS; do
    step=${entry%%:*}
    budget=${entry#*:}
    for override in ${BUDGETS//,/ }; do
        [ "${override%%=*}" = "$step" ] && budget=${override#*=}
    done
    budget=$(scale "$budget")
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$step,"* ]]; then
        continue
    fi
    left=$(( TOTAL - ($(now_ms) - START) / 1000 ))
    [ "$budget" -gt "$left" ] && budget=$left
    if [ "$budget" -lt 8 ]; then
        printf '%s\t0\t0\t%s\tits budget, %s s, is under 8 s (the %s s total is spent, or --time-scale)\n' \
            "$step" "$budget" "$budget" "$TOTAL" >> "$OUTDIR/steps.tsv"
        echo "[gpu] $step: skipped, budget $budget s"
        continue
    fi
    echo "[gpu] $step: up to $budget s ..."
    if [ "$DRY" = 1 ] && [ "$SERIAL" = 0 ]; then
        # on the cpu the numbers mean nothing: the steps share the cores instead of taking turns
        run_step "$step" "$budget" &
    else
        run_step "$step" "$budget"
    fi
done
wait

if ! timeout 20 "$PY" "$ROOT/bench/gpu/steps.py" summary --out "$OUTDIR" > "$OUTDIR/summary.log" 2>&1; then
    # the summary itself failed: say so with what the shell knows
    { echo "# seqpar GPU check: the summary step failed (summary.log)"; echo; echo '```';
      cat "$OUTDIR/steps.tsv"; tail -n 20 "$OUTDIR/summary.log"; echo '```'; } > "$OUTDIR/summary.md"
fi

tmp=$(mktemp "${TMPDIR:-/tmp}/seqpar-gpu-XXXXXX.tar.gz")
tar -czf "$tmp" -C "$OUTDIR" --exclude=results.tar.gz . && mv "$tmp" "$OUTDIR/results.tar.gz"
if [ "$PACK" = 1 ]; then
    find "$OUTDIR" -mindepth 1 -maxdepth 1 ! -name summary.md ! -name summary.json ! -name results.tar.gz \
        -exec rm -rf {} +
fi
echo
cat "$OUTDIR/summary.md"
echo "[gpu] done in $(( ($(now_ms) - START) / 1000 )) s: $OUTDIR"
