#!/bin/bash
# session-12 experiment call: variant timings, GPU tests of the all-changes variant, training steps per variant
set -u
python3 benchmarks/exp_scan_variants.py --no-check --rounds 1 --inkernel --variant s11=exp_variants/fused_s11.py \
  --variant hvec=exp_variants/fused_hvec.py --variant hreg=exp_variants/fused_hreg.py --variant bacc=exp_variants/fused_bacc.py \
  --variant combo=exp_variants/fused_combo.py --variant all=exp_variants/fused_all.py --out $OUT/scan_variants.json
cp ssmtune/ops/selective_scan/fused.py /tmp/fused_current.py
cp exp_variants/fused_all.py ssmtune/ops/selective_scan/fused.py
timeout 100 python3 -m pytest -q -m gpu tests/ops/test_selective_scan_triton.py 2>&1 | tail -5
for v in all s11 current; do
  if [ $v = current ]; then cp /tmp/fused_current.py ssmtune/ops/selective_scan/fused.py; else cp exp_variants/fused_$v.py ssmtune/ops/selective_scan/fused.py; fi
  timeout 80 python3 benchmarks/bench_train_step.py --models mamba --methods none state_offset_h initial_state --sizes 8x2048 4x512 \
    --backends auto auto+graph --no-peers --max-seconds 60 --out $OUT/train_$v.json 2>&1 | grep -E "^\| mamba" 
done
cp /tmp/fused_current.py ssmtune/ops/selective_scan/fused.py
