#!/usr/bin/env bash
# One GPU call: build mamba_ssm's CUDA extension in the background while the GPU tests and benchmarks run, then time
# mamba_ssm's kernels against ours. Run from the repository root on the GPU machine, carrying .whl (pure mamba_ssm
# wheel + .whl/sdist/mamba_ssm-2.3.2.post1.tar.gz):
#
#   bash scripts/gpu_call.sh                     # everything, < 570 s
#   STEPS="build scan scanpeer" bash scripts/gpu_call.sh
#   STEPS=ssd bash scripts/gpu_call.sh            # bench_ssd alone: ~155 s (140 s budget + start and exit)
#
# Steps, in this order (STEPS picks a subset; the order stays):
#   build      benchmarks/build_mamba_ssm.sh .whl/sdist /tmp/mamba_site in the background   -> $OUT/build.log
#   gputest    python3 -m pytest -v -m gpu tests/ops (what `make gpu-test` runs: the GPU tests are all there; 106 s on the
#              H100; every test's line goes to the log as it ends, so a timed-out run still says what passed)
#                                                                                     -> gputest.log
#   exp        EXP_CMD, a one-off experiment (e.g. benchmarks/exp_*.py; not in the default STEPS; CAP_EXP)
#   scan       benchmarks/bench_selective_scan.py (ours; mamba_ssm from constants)    -> bench_selective_scan.json
#   seqscan    benchmarks/exp_selective_scan_sequential.py, the sequential time-major Mamba-1 forward experiment
#              against the n-loop kernel (not in the default STEPS; SEQSCAN_ARGS)      -> scan_sequential.json
#   ssd        benchmarks/bench_ssd.py --budget-s CAP-10 (ours on all shapes first, then mamba_ssm's Triton SSD
#              from the pure wheel and the torch peers; rows print and the JSON is rewritten as they come;
#              default cap 150 s)                                                   -> bench_ssd.json
#   scanpeer   waits for the build, then bench_selective_scan.py --only mamba_ssm     -> bench_selective_scan_mamba_ssm.json
#   infer      benchmarks/bench_scan_inference.py --sweep: inference in the mixer's layout, sequential forward vs
#              copies + n-loop (+ mamba_ssm's scan when a build is ready), 130m-shaped model (not in the default STEPS;
#              INFER_ARGS)                                                          -> bench_scan_inference.json
#   train      benchmarks/bench_train_step.py, ours + HF transformers/peft            -> bench_train_step.json
#   trainpeer  bench_train_step.py --only-stack mamba_ssm --compare bench_train_step.json
#                                                                                     -> bench_train_step_mamba_ssm.json
#   profile    benchmarks/profile_train_step.py: a training step's GPU time per kernel category, ours against
#              mamba_ssm's model when the build is ready (not in the default STEPS; PROFILE_ARGS)
#                                                                                     -> profile_train_step.json
#   serve      benchmarks/bench_serve.py, 130m shape, 1/4/16 adapters (SERVE_ARGS, e.g. "--kinds mixed")
#              (not in the default STEPS)                                            -> bench_serve.json
#   dist       torchrun bench_distributed.py for 1, 2, 4, 8 GPUs (as many as nvidia-smi lists), then --summarize
#              (issue #8; not in the default STEPS; DIST_ARGS adds options)   -> bench_dist_N.json, bench_dist.md
# Every step runs under `timeout`, capped at CAP_<STEP> seconds (defaults below) and at what is left before
# DEADLINE_S (555 s from the start); a step with less than MIN_STEP_S (20) left is skipped; a failing step does not
# stop the others. Each step runs in its own process group (setsid), killed as a whole when the step ends or times
# out, so that no orphan of one step (a compile worker, a background child) loads the CPUs during the next. All
# output also goes to $OUT/call.log; a summary table prints last. Files in $OUT: at most 8.
# Env: STEPS, DEADLINE_S, CAP_GPUTEST, CAP_SCAN, CAP_SEQSCAN, CAP_SSD, CAP_SCANPEER, CAP_TRAIN, CAP_TRAINPEER,
# CAP_SERVE, CAP_INFER, CAP_PROFILE, CAP_DIST, CAP_EXP, BUILD_WAIT_UNTIL_S
# (the latest elapsed second scanpeer/trainpeer wait for the build until, 330), GPU_TEST_ARGS ("tests/ops"),
# SCAN_ARGS, SEQSCAN_ARGS, SSD_ARGS, INFER_ARGS, PROFILE_ARGS, TRAIN_ARGS, TRAINPEER_ARGS (extra arguments), MAMBA_SITE (/tmp/mamba_site),
# SDIST_DIR (.whl/sdist), PYTHON (python3), and those of build_mamba_ssm.sh (MAMBA_BUILD_LEVELS, MAX_JOBS).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-/tmp/gpu_call_out}
mkdir -p "$OUT"
STEPS=" ${STEPS:-build gputest scan ssd scanpeer train trainpeer} "
DEADLINE_S=${DEADLINE_S:-555}
MIN_STEP_S=${MIN_STEP_S:-20}
CAP_GPUTEST=${CAP_GPUTEST:-150}
CAP_SCAN=${CAP_SCAN:-100}
CAP_SEQSCAN=${CAP_SEQSCAN:-150}
CAP_SSD=${CAP_SSD:-150}
CAP_SCANPEER=${CAP_SCANPEER:-45}
CAP_TRAIN=${CAP_TRAIN:-150}
CAP_TRAINPEER=${CAP_TRAINPEER:-75}
CAP_SERVE=${CAP_SERVE:-150}
CAP_INFER=${CAP_INFER:-200}
CAP_PROFILE=${CAP_PROFILE:-120}
CAP_EXP=${CAP_EXP:-120}
CAP_DIST=${CAP_DIST:-300}
BUILD_WAIT_UNTIL_S=${BUILD_WAIT_UNTIL_S:-330}
MAMBA_SITE=${MAMBA_SITE:-/tmp/mamba_site}
SDIST_DIR=${SDIST_DIR:-.whl/sdist}
PY=${PYTHON:-python3}
PURE_SITE=/tmp/site
export PYTHONUNBUFFERED=1
T0=$SECONDS
SUMMARY=$(mktemp /tmp/gpu_call_steps.XXXXXX)

exec > >(tee -a "$OUT/call.log") 2>&1

log() { printf '[%s +%3ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - T0)) "$*"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }
left() { echo $((DEADLINE_S - (SECONDS - T0))); }
# grant CAP: the seconds a step may take now (its cap, or what is left before the deadline)
grant() {
    local l
    l=$(left)
    if [ "$1" -lt "$l" ]; then echo "$1"; else echo "$l"; fi
}
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"; }
# kill_group PGID: TERM the step's process group, KILL what is left after 3 s
kill_group() {
    local pg=$1 i n
    kill -0 -- "-$pg" 2>/dev/null || return 0
    n=$(pgrep -g "$pg" 2>/dev/null | wc -l)
    log "killing ${n:-?} leftover process(es) of the step (group $pg)"
    kill -TERM -- "-$pg" 2>/dev/null
    for i in 1 2 3 4 5 6; do
        kill -0 -- "-$pg" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -KILL -- "-$pg" 2>/dev/null
    return 0
}
# step NAME SECONDS CMD: run CMD (a bash string, echoed first) under timeout in its own session / process group,
# record rc and duration, then kill whatever of that group is still alive (background children, a python whose
# bash was killed by timeout): orphans of one step must not load the CPU during the next one.
step() {
    local name=$1 t=$2 cmd=$3 s rc pgf pg
    if [ "$t" -lt "$MIN_STEP_S" ]; then
        log "SKIP $name: only ${t} s left before DEADLINE_S=$DEADLINE_S"
        record "$name" skip 0 "budget"
        return 0
    fi
    log "+ timeout ${t}s: $cmd"
    s=$SECONDS
    pgf=$(mktemp /tmp/gpu_call_pgid.XXXXXX)
    # setsid makes the bash below a session and group leader, so its $$ is the group id of everything the step starts
    # (timeout only signals its own child and its own group, which the step has left)
    timeout -k 5 "$t" setsid bash -c 'echo $$ >"$0"; bash -c "$1"' "$pgf" "$cmd"
    rc=$?
    pg=$(cat "$pgf" 2>/dev/null)
    rm -f "$pgf"
    [ -n "$pg" ] && kill_group "$pg"
    local note=ok
    [ $rc -eq 0 ] || note="rc=$rc"
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note="timed out at ${t}s"
    log "= $name: $note after $((SECONDS - s)) s"
    record "$name" "$rc" $((SECONDS - s)) "$note"
}
# build_ready: 0 when the build's marker says ok; waits for the marker until BUILD_WAIT_UNTIL_S (or the deadline)
build_ready() {
    local until=$BUILD_WAIT_UNTIL_S
    [ "$until" -lt $((DEADLINE_S - MIN_STEP_S)) ] || until=$((DEADLINE_S - MIN_STEP_S))
    if [ ! -f "$MAMBA_SITE.status" ] && [ -n "${BUILD_PID:-}" ]; then
        log "waiting for the mamba_ssm build (pid $BUILD_PID) until +${until}s"
        while [ ! -f "$MAMBA_SITE.status" ] && [ $((SECONDS - T0)) -lt "$until" ] && kill -0 "$BUILD_PID" 2>/dev/null; do
            sleep 2
        done
    fi
    if [ -f "$MAMBA_SITE.status" ]; then
        log "build marker: $(cat "$MAMBA_SITE.status")"
        grep -q '^status=ok' "$MAMBA_SITE.status"
        return
    fi
    log "build not finished at +$((SECONDS - T0))s (see build.log)"
    return 1
}

log "gpu_call: steps [${STEPS# }] deadline ${DEADLINE_S}s, OUT=$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv,noheader 2>&1 | head -n 2
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1 | tail -n 1

# 1. the build, in the background (its own log; its marker $MAMBA_SITE.status says when it is done)
if want build; then
    rm -f "$MAMBA_SITE.status"
    log "+ bash benchmarks/build_mamba_ssm.sh $SDIST_DIR $MAMBA_SITE > $OUT/build.log 2>&1 &"
    PYTHON=$PY bash benchmarks/build_mamba_ssm.sh "$SDIST_DIR" "$MAMBA_SITE" >"$OUT/build.log" 2>&1 &
    BUILD_PID=$!
fi
# the pure mamba_ssm wheel (Triton SSD for the tests and bench_ssd), if carried
if ls .whl/mamba_ssm-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PURE_SITE" .whl/mamba_ssm-*.whl \
        && log "pure mamba_ssm wheel in $PURE_SITE"
fi

# 2. GPU tests
if want gputest; then
    step gputest "$(grant "$CAP_GPUTEST")" \
        "PYTHONPATH=$PURE_SITE:. $PY -m pytest -v -m gpu -p no:cacheprovider --durations=10 ${GPU_TEST_ARGS:-tests/ops} > $OUT/gputest.log 2>&1; rc=\$?; grep -E 'PASSED|FAILED|ERROR|SKIPPED|passed|failed|skipped' $OUT/gputest.log | tail -n 40; exit \$rc"
fi
# 2b. an experiment's command line (EXP_CMD, run with PYTHONPATH=.; its files go to $OUT through $OUT in the command)
if want exp; then
    step exp "$(grant "$CAP_EXP")" "export PYTHONPATH=. OUT=$OUT; ${EXP_CMD:-true}"
fi
# 3. ours (mamba_ssm from constants unless the build is already there, which it is not yet)
if want scan; then
    step scan "$(grant "$CAP_SCAN")" \
        "PYTHONPATH=. $PY benchmarks/bench_selective_scan.py --no-mamba-ssm --out $OUT/bench_selective_scan.json ${SCAN_ARGS:-}"
fi
if want seqscan; then
    step seqscan "$(grant "$CAP_SEQSCAN")" \
        "PYTHONPATH=. $PY benchmarks/exp_selective_scan_sequential.py --out $OUT/scan_sequential.json ${SEQSCAN_ARGS:-}"
fi
if want ssd; then
    t=$(grant "$CAP_SSD")
    step ssd "$t" "PYTHONPATH=$PURE_SITE:. $PY benchmarks/bench_ssd.py --out $OUT/bench_ssd.json --budget-s $((t - 10 > 10 ? t - 10 : 10)) ${SSD_ARGS:-}"
fi
# 4. the selective-scan peer rows (the build should be done by now)
if want scanpeer; then
    if build_ready; then
        main=""
        [ -f "$OUT/bench_selective_scan.json" ] && main="--main-json $OUT/bench_selective_scan.json"
        step scanpeer "$(grant "$CAP_SCANPEER")" \
            "PYTHONPATH=$MAMBA_SITE:. $PY benchmarks/bench_selective_scan.py --only mamba_ssm $main --out $OUT/bench_selective_scan_mamba_ssm.json ${SCAN_ARGS:-}"
    else
        record scanpeer skip 0 "build not ready"
    fi
fi
# 4b. inference in the mixer's layout: the sequential forward against copies + n-loop, a configuration sweep, a
# 130m-shaped model's no-grad forward; mamba_ssm's scan too when a build of this call or an earlier one is ready
if want infer; then
    site=.
    if { want build || [ -f "$MAMBA_SITE.status" ]; } && build_ready; then site=$MAMBA_SITE:.; fi
    t=$(grant "$CAP_INFER")
    step infer "$t" "PYTHONPATH=$site $PY benchmarks/bench_scan_inference.py --sweep --budget-s $((t - 20 > 10 ? t - 20 : 10)) --out $OUT/bench_scan_inference.json ${INFER_ARGS:-}"
fi
# 5. model-level training step: ours + HF peer, then mamba_ssm's model merged with it
if want train; then
    t=$(grant "$CAP_TRAIN")
    step train "$t" "PYTHONPATH=. $PY benchmarks/bench_train_step.py --backends auto --max-seconds $((t - 45 > 10 ? t - 45 : 10)) --out $OUT/bench_train_step.json ${TRAIN_ARGS:-}"
fi
if want trainpeer; then
    if build_ready; then
        t=$(grant "$CAP_TRAINPEER")
        cmp=""
        [ -f "$OUT/bench_train_step.json" ] && cmp="--compare $OUT/bench_train_step.json"
        step trainpeer "$t" "PYTHONPATH=$MAMBA_SITE:. $PY benchmarks/bench_train_step.py --only-stack mamba_ssm $cmp --max-seconds $((t - 25 > 10 ? t - 25 : 10)) --out $OUT/bench_train_step_mamba_ssm.json ${TRAINPEER_ARGS:-${TRAIN_ARGS:-}}"
    else
        record trainpeer skip 0 "build not ready"
    fi
fi
# 5b. where the step's GPU time goes, kernel by kernel: ours against the authors' stack (when its build is ready)
if want profile; then
    site=.
    if { want build || [ -f "$MAMBA_SITE.status" ]; } && build_ready; then site=$MAMBA_SITE:.; fi
    step profile "$(grant "$CAP_PROFILE")" \
        "PYTHONPATH=$site $PY benchmarks/profile_train_step.py --out $OUT/profile_train_step.json ${PROFILE_ARGS:-}"
fi
# 6. serving throughput (mixed-adapter batches against switching adapters per request)
if want serve; then
    step serve "$(grant "$CAP_SERVE")" \
        "PYTHONPATH=. $PY benchmarks/bench_serve.py --shape 130m --requests 32 --max-batch 16 --repeats 1 --out $OUT/bench_serve.json ${SERVE_ARGS:-}"
fi
# 7. data-parallel scaling (issue #8): one torchrun per world size, weak scaling, then the table
if want dist; then
    ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
    [ "$ngpu" -ge 1 ] || ngpu=1
    cmd=""
    for n in 1 2 4 8; do
        [ "$n" -le "$ngpu" ] || break
        cmd+="$PY -m torch.distributed.run --standalone --nproc_per_node $n benchmarks/bench_distributed.py --steps 6 --warmup 2 --out $OUT/bench_dist_$n.json ${DIST_ARGS:-}; "
    done
    cmd+="$PY benchmarks/bench_distributed.py --summarize $OUT/bench_dist_*.json | tee $OUT/bench_dist.md"
    step dist "$(grant "$CAP_DIST")" "PYTHONPATH=. $cmd"
fi
if [ -n "${BUILD_PID:-}" ] && kill -0 "$BUILD_PID" 2>/dev/null; then
    log "the build is still running (pid $BUILD_PID); it ends with this call. Tail of build.log:"
    tail -n 5 "$OUT/build.log"
fi

# 8. summary, last
log "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
"$PY" - "$OUT" "$SUMMARY" "$MAMBA_SITE.status" <<'PYEOF'
import json
import sys
from pathlib import Path

out, summary, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])


def load(name):
    try:
        return json.loads((out / name).read_text())
    except Exception:  # noqa: BLE001 - missing or cut short
        return None


print("\n==== gpu_call summary ====")
for line in summary.read_text().splitlines():
    name, rc, secs, note = line.split("\t")
    print(f"{name:<10} {note:<22} {secs:>4} s")
print("build:", marker.read_text().strip() if marker.exists() else "no marker (not finished or not run)")

scan, peer = load("bench_selective_scan.json"), load("bench_selective_scan_mamba_ssm.json")
if scan or peer:
    print("\nMamba-1 selective scan, peer variant, bf16, ms (ours / mamba_ssm; ratio < 1: ours faster)")
    ours = {r["D"]: r for r in (scan or {}).get("rows", []) if r["variant"] == "peer"}
    live = {r["D"]: r for r in (peer or {}).get("rows", []) if r["variant"] == "peer"}
    for d in sorted(set(ours) | set(live)):
        o, p = ours.get(d), live.get(d)
        parts = [f"D={d:>5}"]
        if o:
            parts.append(f"ours(main) fwd {o['fwd_ms']:.3f} f+b {o['fwd_bwd_ms']:.3f}")
        if p and p.get("mamba_ssm_source") == "live":
            parts.append(f"ours(peer run) {p['fwd_ms']:.3f}/{p['fwd_bwd_ms']:.3f}; mamba_ssm LIVE "
                         f"{p['mamba_ssm_fwd_ms']:.3f}/{p['mamba_ssm_fwd_bwd_ms']:.3f}; "
                         f"ratio {p['vs_mamba_ssm_fwd']:.2f}x/{p['vs_mamba_ssm_fwd_bwd']:.2f}x")
        elif o and "mamba_ssm_fwd_ms" in o:
            parts.append(f"mamba_ssm FALLBACK constants {o['mamba_ssm_fwd_ms']:.3f}/{o['mamba_ssm_fwd_bwd_ms']:.3f}; "
                         f"ratio {o['vs_mamba_ssm_fwd']:.2f}x/{o['vs_mamba_ssm_fwd_bwd']:.2f}x")
        print("  " + "; ".join(parts))
    if peer and "mamba_ssm_check_err" in peer:
        print(f"  mamba_ssm vs fp32 reference: max rel err {peer['mamba_ssm_check_err']:.1e}")

ssd = load("bench_ssd.json")
if ssd is not None:
    n = len(ssd.get("rows", ssd.get("results", []))) if isinstance(ssd, dict) else "?"
    print(f"\nbench_ssd.json: {n} rows (its own table is in call.log)")

train = load("bench_train_step_mamba_ssm.json") or load("bench_train_step.json")
if train:
    print("\nTraining step (bf16 base): tokens/s (peak GiB); main backend, HF+peft, mamba_ssm unfused")
    rows = [r for r in train["rows"] if r.get("backend") in ("auto", "auto+graph", "torch-path", "unfused")]
    keys = sorted({(r["model"], r["batch"], r["seqlen"]) for r in rows})
    cols = [("ssmtune", "none"), ("ssmtune", "state_offset_h"), ("ssmtune", "initial_state"), ("ssmtune", "lora"),
            ("hf+peft", "lora"), ("mamba_ssm", "none")]
    print(f"  {'model':<7}{'B':>2}{'L':>5} " + " ".join(f"{s[:7] + ':' + m[:9]:>20}" for s, m in cols))
    for k in keys:
        cells = []
        for s, m in cols:
            r = next((r for r in rows if (r["model"], r["batch"], r["seqlen"]) == k
                      and r["stack"] == s and r["method"] == m), None)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"].split(":")[0][:18])
            else:
                pk = f"({r['peak_gib']:.1f})" if r.get("peak_gib") is not None else ""
                cells.append(f"{r['tokens_per_s'] / 1e3:,.1f}k{pk}")
        print(f"  {k[0]:<7}{k[1]:>2}{k[2]:>5} " + " ".join(f"{c:>20}" for c in cells))
    vs = [r for r in train["rows"] if r.get("vs_mamba_ssm") and r["stack"] == "ssmtune"
          and r["method"] in ("none", "state_offset_h")]
    for r in vs:
        mem = f"{r['mem_vs_mamba_ssm']:.2f}x" if r.get("mem_vs_mamba_ssm") else "n/a"
        print(f"  {r['model']} {r['method']} B{r['batch']} L{r['seqlen']}: {r['vs_mamba_ssm']:.2f}x mamba_ssm tokens/s, "
              f"{mem} its peak memory")
PYEOF
rm -f "$SUMMARY"
log "gpu_call done"
