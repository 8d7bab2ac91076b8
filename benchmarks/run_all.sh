#!/usr/bin/env bash
# Run the CPU benchmarks one after the other (they time the same cores: never in parallel) and collect
# their JSON into OUT_DIR/all.json ({"name": {...benchmark JSON...}}), each benchmark's stdout/stderr in
# OUT_DIR/<name>.json / <name>.log. bench_gpu_llama7b.py is not run here (it needs a GPU).
#
#   bash benchmarks/run_all.sh OUT_DIR                 # model, shards, e2e (the e2e part takes several minutes)
#   BENCHMARKS="model shards" bash benchmarks/run_all.sh OUT_DIR
#   SHARDS_DATA=shards/ml100k-tiny SHARDS_RUN=runs/x bash benchmarks/run_all.sh OUT_DIR
#
# bench_shards needs a preprocessed dataset: SHARDS_DATA (default shards/demo, which the e2e launcher
# builds when it is missing: so it is built here first if absent). A benchmark that fails is recorded as
# {"error": ..., "returncode": N} and the others still run; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: run_all.sh OUT_DIR}
mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BENCHMARKS=${BENCHMARKS:-"model shards e2e"}
SHARDS_DATA=${SHARDS_DATA:-shards/demo}

if [[ " $BENCHMARKS " == *" shards "* && ! -f "$SHARDS_DATA/manifest.json" && "$SHARDS_DATA" == "shards/demo" ]]; then
  "$PY" -c "from cllm4rec_dist.corpus.preprocess import demo_dataset; from cllm4rec_dist.train.config import load_config; \
demo_dataset(load_config('configs/demo.yaml').data)" >"$OUT/demo-data.log" 2>&1 || { echo "building shards/demo failed: see $OUT/demo-data.log"; exit 1; }
fi

failed=0
for name in $BENCHMARKS; do
  case $name in
    model)  cmd=("$PY" benchmarks/bench_model.py) ;;
    shards) cmd=("$PY" benchmarks/bench_shards.py --data "$SHARDS_DATA" ${SHARDS_RUN:+--run "$SHARDS_RUN"}) ;;
    e2e)    cmd=("$PY" benchmarks/bench_e2e.py) ;;
    *) echo "unknown benchmark '$name' (model, shards, e2e)"; exit 2 ;;
  esac
  echo "[run_all] $name: ${cmd[*]}"
  start=$(date +%s)
  "${cmd[@]}" >"$OUT/$name.json" 2>"$OUT/$name.log"
  rc=$?
  echo "[run_all] $name: exit $rc after $(( $(date +%s) - start )) s"
  [ $rc -eq 0 ] || failed=1
  printf '%s\n' "$rc" >"$OUT/$name.rc"
  printf '%s\n' "${cmd[*]}" >"$OUT/$name.cmd"
  printf '%s\n' "$(( $(date +%s) - start ))" >"$OUT/$name.seconds"
done

"$PY" - "$OUT" $BENCHMARKS <<'EOF'
import json, os, platform, sys
out, names = sys.argv[1], sys.argv[2:]
collected = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}}
for name in names:
    read = lambda ext: open(os.path.join(out, f"{name}.{ext}")).read().strip()
    entry = {"command": read("cmd"), "returncode": int(read("rc")), "wall_seconds": int(read("seconds"))}
    text = read("json")
    try:  # the JSON object is everything from the first line that opens it (bench_gpu prints a table after)
        start = text.index("{")
        entry["result"] = json.JSONDecoder().raw_decode(text[start:])[0]
    except ValueError:
        entry["error"] = f"no JSON on stdout; see {name}.log"
    collected[name] = entry
with open(os.path.join(out, "all.json"), "w") as f:
    json.dump(collected, f, indent=2)
print(f"[run_all] wrote {os.path.join(out, 'all.json')}")
EOF
exit $failed
