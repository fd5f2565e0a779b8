#!/usr/bin/env bash
# Issue 9's GPU measurements in one command, within a time budget, on one H100:
#   bash benchmarks/run_perf_suite.sh OUTDIR [SECTION ...]     (default: every section)
# Sections, in priority order (each writes OUTDIR/<name>.json and .md, row by row, so a section cut
# short keeps the rows it finished):
#   train_step        base, then small: full training (fp32 master weights, bf16 autocast, fused AdamW),
#                     with a kernel-time profile of one step
#   rollout           base: 4-step distilled chunk breakdown (+ profile), one 50-step CFG chunk,
#                     HunyuanVideo-1.5 VAE decode
#   train_step_hy15   hy15 with LoRA, frozen bf16 base, activation checkpointing (does it fit 80 GB?)
#   peer              diffusers HunyuanVideo15Transformer3DModel at the base shape vs WorldDiT, fwd and fwd+bwd
#   attention         the attention kernels alone on base's layouts, per backend
# Further sections, run only when named (measurements of later issues):
#   render            synthetic-world data generation on the GPU at gpu_small's settings (issue 14)
#   decode            streaming vs overlapped HunyuanVideo-1.5 VAE decode per 16-frame chunk (issue 20)
#   serve             the play server: key press to frame and frames/s delivered, base preset (issue 19)
#   parity            HunyuanVideo-1.5 at its full 8.3B shape, random bf16 weights, vs diffusers (issue 18)
# Then OUTDIR/results.md (all tables), OUTDIR/suite.json (per-section status and seconds) and a
# short summary printed last.
#
# Environment knobs: BUDGET_S (default 600: total seconds for all sections; a section gets at most
# what is left, a section with under 30 s left is skipped and listed as such), PYTHON (default
# python3), PERF_TINY=1 (tiny CPU shapes: checks the script itself on a machine without a GPU).
# On the GPU machine diffusers and omegaconf come from ../shared/gpu/wheels.sh: send .whl/ with the
# checkout; it is installed to /tmp/site here when they are not importable.
set -uo pipefail
out=${1:?usage: bash benchmarks/run_perf_suite.sh OUTDIR [SECTION ...]}
shift
only=("$@")
cd "$(dirname "$0")/.."
mkdir -p "$out"
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-600}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # base training runs near 80 GB

if ! $PY -c "import diffusers, omegaconf" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "warning: diffusers/omegaconf not importable and no .whl/ here (../shared/gpu/wheels.sh builds it)" >&2
  fi
fi

if [[ ${PERF_TINY:-0} == 1 ]]; then
  shape=(--device cpu)
  train=(--preset tiny --latents 8 --height 4 --width 6 --text 8 --warmup 1 --steps 2 "${shape[@]}")
  sections=(
    "train_step|150|-m benchmarks.train_step ${train[*]} --ckpt-on-oom"
    "rollout|120|-m benchmarks.rollout --preset tiny --height 4 --width 6 --text 8 --warmup 1 --reps 2 --guided-steps 3 --decode-reps 2 ${shape[*]}"
    "train_step_hy15|120|-m benchmarks.train_step ${train[*]} --lora --grad-ckpt"
    "peer|120|-m benchmarks.peer_diffusers --preset tiny --latents 4 --height 4 --width 6 --text 8 --warmup 1 --steps 2 --layouts peer trained ${shape[*]}"
    "attention|120|-m benchmarks.attention_kernels --preset tiny --height 4 --width 6 --text 8 --latents 8 --context 4 --warmup 1 --reps 2 --backend sdpa cudnn ${shape[*]}"
  )
  named=(
    "render|120|-m benchmarks.render_speed --device cpu --size 32 --frames 9 --clips 2 --batch 2 --stride 1"
    "decode|120|-m benchmarks.decode_speed --tiny --device cpu --height 32 --width 32 --reps 1 --json {out}.json"
    "serve|150|-m benchmarks.serve_latency --preset tiny --device cpu --client ws --presses 2 --seconds 2 --json {out}.json"
  )
else
  sections=(
    "train_step|200|-m benchmarks.train_step --preset base small --warmup 2 --steps 8 --ckpt-on-oom --profile"
    "rollout|130|-m benchmarks.rollout --preset base --warmup 2 --reps 6 --guided-steps 50 --guided-reps 1 --decode-reps 3 --profile"
    "train_step_hy15|170|-m benchmarks.train_step --preset hy15 --lora --grad-ckpt --warmup 1 --steps 3"
    "peer|150|-m benchmarks.peer_diffusers --preset base --warmup 1 --steps 3 --layouts peer trained --ckpt-on-oom"
    "attention|120|-m benchmarks.attention_kernels --preset base --backend flex sdpa cudnn --branches fused --warmup 2 --reps 6"
  )
  named=(
    "render|120|-m benchmarks.render_speed --device cuda --size 128 --frames 65 --clips 256 --batch 32 --workers 12 --supersample 2 --stride 1"
    "decode|150|-m benchmarks.decode_speed --json {out}.json"
    "serve|150|-m benchmarks.serve_latency --preset base --device cuda --dtype bf16 --json {out}.json"
    "parity|240|-m benchmarks.hy15_parity --json {out}.json"
  )
fi

start=$(date +%s)
status=()
for s in "${sections[@]}" "${named[@]}"; do
  IFS='|' read -r name cap cmd <<<"$s"
  if ((${#only[@]})) && [[ ! " ${only[*]} " == *" $name "* ]]; then
    continue
  fi
  if [[ " ${named[*]} " == *"$s"* ]] && ! ((${#only[@]})); then
    continue  # the further sections run only when named
  fi
  left=$((BUDGET_S - ($(date +%s) - start)))
  limit=$((cap < left ? cap : left))
  if ((limit < 30)); then
    echo "== $name: skipped ($left s of the budget left)"
    status+=("{\"section\": \"$name\", \"status\": \"skipped: budget\", \"seconds\": 0}")
    continue
  fi
  if [[ $cmd == *"{out}"* ]]; then
    cmd=${cmd//\{out\}/$out/$name}  # the command names its own output file
  elif [[ $cmd != *render_speed* ]]; then
    cmd="$cmd --out $out/$name"  # (render_speed prints its JSON line into the log)
  fi
  echo "== $name (limit ${limit}s): $PY $cmd"
  t0=$(date +%s)
  # shellcheck disable=SC2086  # cmd is a word list on purpose
  timeout --signal=TERM --kill-after=10 "$limit" $PY $cmd 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  dt=$(($(date +%s) - t0))
  case $rc in 0) st=ok ;; 124 | 137) st="cut at ${limit}s" ;; *) st="failed (rc $rc)" ;; esac
  echo "== $name: $st in ${dt}s"
  status+=("{\"section\": \"$name\", \"status\": \"$st\", \"seconds\": $dt, \"command\": \"python $cmd\"}")
done

(IFS=,; echo "[${status[*]}]") >"$out/suite.json"
$PY - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
suite = json.loads((out / "suite.json").read_text())
parts = ["# Performance suite results", ""]
parts += [f"- {s['section']}: {s['status']} ({s['seconds']} s)" for s in suite] + [""]
for s in suite:
    md = out / f"{s['section']}.md"
    if md.exists():
        parts.append(md.read_text())
(out / "results.md").write_text("\n".join(parts))

def rows(name):
    p = out / f"{name}.json"
    return json.loads(p.read_text())["rows"] if p.exists() else []

def f(v, spec):
    return "–" if v is None else format(v, spec)

print("\n== summary (details in results.md)")
for r in rows("train_step") + rows("train_step_hy15"):
    if "step_s" in r:
        print(f"train {r['preset']:5s} lora {r['lora']:3s} {r['backend']:5s}: {r['step_s']:.3f} s/step, "
              f"{r['tokens_per_s']:,.0f} tok/s, MFU {f(r.get('mfu_989'), '.1%')} of 989 / {f(r.get('mfu_800'), '.1%')} of 800, "
              f"peak {r['peak_gib']:.1f} GiB{' (' + r['note'] + ')' if r.get('note') else ''}")
    else:
        print(f"train {r.get('preset')}: {r.get('note')}")
for r in rows("rollout"):
    if r.get("fps") is not None:
        print(f"rollout {r['setting']:18s} {r['phase']:40s} {r['median_ms']:8.1f} ms  {r['fps']:6.1f} frames/s")
for r in rows("peer"):
    if "median_s" in r:
        print(f"peer {r['model'][:34]:34s} {r.get('layout', ''):26s} {r['what']:7s} {r['median_s']:.3f} s"
              f"{'  ratio ' + format(r['ratio'], '.2f') if r.get('ratio') is not None else ''}")
    else:
        print(f"peer {r.get('model')} {r.get('what')}: {r.get('note')}")
EOF
