#!/usr/bin/env bash
# The prepared GPU check: one call on a GPU machine runs it all and writes the results into files
# that come back. docs/performance/gpu.md says how to run it and what each file holds.
#
#   scripts/gpu_check.sh                 CUDA, bf16: at most 6.9 minutes of parts on an H200 (each has its own timeout)
#   scripts/gpu_check.sh --cpu-short     every part in a tiny form on CPU (CI runs this: tests/core/test_gpu_check.py)
#   options: --out DIR (default: $OUT, else ./gpu_check_out)   --only step_costs,long_context,...   --python PY
#
# Parts (each runs under `timeout`, so one failure or hang does not lose the others):
#   step_costs    scripts/gpu_step_costs.py: a random-weight ~1B / ~100M Llama pair in bf16: one-token step,
#                 verify blocks of 4/8/16 tokens, batched decode B=1..16            -> step_costs.json
#   long_context  scripts/gpu_long_context.py: an 8B-shaped GQA Llama (random, bf16) at 4k and 8k: lean vs
#                 transformers, step times vs the bandwidth floor, B=8 vs B=1, fused kernels, chunk and
#                 pool memory vs the capacity model; thresholds (exit 1 if one fails) -> long_context.json
#   bench_serve   a server on the tiny pair on CUDA + `adasd bench-serve` at 1-16 clients, ar and adasd;
#                 the summary prints the draft lengths the planner chose            -> bench_serve.json
#   core_tests    pytest of the lean forward's and the engine's tests, ADASD_TEST_DEVICE=cuda -> core_tests.log
#   server_tests  pytest of the OpenAI-client server tests (--device auto: cuda)     -> server_tests.log
# plus summary.md / summary.json (each part's status and seconds, the machine, the thresholds) and
# misc.log (every other output: wheel install, server logs). 8 files: what the device tool brings back.
#
# The GPU image has torch and transformers but not fastapi, uvicorn, pydantic(-settings) or openai:
# scripts/gpu_wheels.sh fills .whl/ beforehand; this script installs .whl/*.whl into a private folder.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODE=cuda
OUT_DIR=${OUT:-$REPO/gpu_check_out}
PY=${PYTHON:-python3}
ONLY=""
RUN_PART=""  # internal: the script runs each part as `timeout LIMIT gpu_check.sh --run-part NAME`
PARTS=(step_costs long_context bench_serve core_tests server_tests)

while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-short) MODE=cpu ;;
    --out) OUT_DIR=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --python) PY=$2; shift ;;
    --run-part) RUN_PART=$2; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
MISC="$OUT_DIR/misc.log"
cd "$REPO"

if [ "$MODE" = cuda ]; then
  DEVICE=cuda DTYPE=bfloat16
  # seconds per part: 6.9 minutes if every part runs to its limit, so that with the machine's start the
  # whole call fits 8 minutes and a rerun fits the 15 minutes of a lease
  T_STEP=50 T_LONG=130 T_SERVE=100 T_CORE=80 T_SERVER=55
else
  DEVICE=cpu DTYPE=float32
  # limits only against hangs: about 1.5 minutes in all on an idle 2-core machine
  T_STEP=100 T_LONG=100 T_SERVE=100 T_CORE=100 T_SERVER=100
fi
ADASD=("$PY" -m adasd_core.cli)

log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$MISC" >&2; }

want() {  # is part $1 selected?
  [ -z "$ONLY" ] && return 0
  case ",$ONLY," in *",$1,"*) return 0 ;; esac
  return 1
}

record() {  # record NAME STATUS SECONDS FILE NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STATUS"
  log "$1: $2 (${3}s) $5"
}

run_part() {  # run_part NAME SECONDS FILE: part_NAME under timeout; record ok / failed / timeout
  local name=$1 limit=$2 file=$3
  if ! want "$name"; then record "$name" skipped 0 "" "not in --only"; return; fi
  if [ -n "${SKIP_REASON[$name]:-}" ]; then record "$name" skipped 0 "" "${SKIP_REASON[$name]}"; return; fi
  log "$name: starting (limit ${limit}s)"
  local t0=$SECONDS rc
  local args=(--out "$OUT_DIR" --python "$PY" --run-part "$name")
  [ "$MODE" = cpu ] && args+=(--cpu-short)
  # timeout puts the part in its own process group and signals all of it (pytest, servers) at the limit
  timeout --kill-after=15 "$limit" bash "$REPO/scripts/gpu_check.sh" "${args[@]}"
  rc=$?
  local dt=$((SECONDS - t0)) status=ok note=""
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=timeout note="stopped after ${limit}s"
  elif [ $rc -ne 0 ]; then status=failed note="exit status $rc"
  elif [ -n "$file" ] && [ ! -s "$OUT_DIR/$file" ]; then status=failed note="$file was not written"
  fi
  record "$name" "$status" "$dt" "$file" "$note"
}

# ---------------------------------------------------------------------------- parts

part_step_costs() {
  local extra=(--iters 15)
  [ "$MODE" = cpu ] && extra=(--tiny)
  "$PY" scripts/gpu_step_costs.py --device "$DEVICE" --dtype "$DTYPE" --out "$OUT_DIR/step_costs.json" \
    "${extra[@]}" >>"$MISC" 2>&1
}

part_long_context() {  # its exit status says whether every enforced threshold held; the JSON is written either way
  local extra=()
  [ "$MODE" = cpu ] && extra=(--tiny)
  "$PY" scripts/gpu_long_context.py --device "$DEVICE" --dtype "$DTYPE" --out "$OUT_DIR/long_context.json" \
    "${extra[@]}" >>"$MISC" 2>&1
}

# The concurrency x method sweep: adjust here (see adasd_core/bench/serve.py). ar beside adasd, so the
# summary can say whether drafting turned on where it pays.
bench_serve_sweep() {  # bench_serve_sweep BASE_URL
  local levels=1,2,4,8,16 size=(--max-tokens 64 --repeats 1 --no-in-process)
  [ "$MODE" = cpu ] && levels=1 size=(--max-tokens 8 --requests 2 --repeats 1 --no-in-process)
  "${ADASD[@]}" bench-serve "$1" --concurrency "$levels" --methods ar,adasd "${size[@]}" --target tiny --draft tiny \
    --device "$DEVICE" --dtype "$DTYPE" --no-plots --out "$GPU_CHECK_WORK/bench_serve" >>"$MISC" 2>&1 || return
  cp "$GPU_CHECK_WORK/bench_serve/bench_serve.json" "$OUT_DIR/bench_serve.json"
}

part_bench_serve() {
  local port rc
  port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  "$PY" -m server --target tiny --draft tiny --device "$DEVICE" --dtype "$DTYPE" --host 127.0.0.1 --port "$port" \
    --max-running 16 --max-queue 256 --log-level warning >"$GPU_CHECK_WORK/server.log" 2>&1 &
  local pid=$!
  local ready=1
  for _ in $(seq 1 240); do
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    if "$PY" -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$port/ready', timeout=2).status_code != 200)" \
        2>/dev/null; then ready=0; break; fi
    sleep 0.5
  done
  if [ $ready -eq 0 ]; then
    bench_serve_sweep "http://127.0.0.1:$port"
    rc=$?
  else
    echo "the server on port $port did not become ready" >>"$MISC"
    rc=1
  fi
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null
  { echo "--- server log"; tail -n 60 "$GPU_CHECK_WORK/server.log"; } >>"$MISC"
  return $rc
}

part_core_tests() {
  # the lean forward against transformers (ragged, folded, split) and greedy equivalence, on the card
  local sel=(tests/core/test_lean.py tests/core/test_engine_models.py tests/core/test_device.py)
  [ "$MODE" = cpu ] && sel=(tests/core/test_verification.py "tests/core/test_cli_errors.py::test_bad_names")
  ADASD_TEST_DEVICE=$DEVICE ADASD_TEST_DTYPE=float32 "$PY" -m pytest "${sel[@]}" -q -p no:cacheprovider --timeout 90 \
    --basetemp "$GPU_CHECK_WORK/pytest_core" -o addopts="" -rfE >"$OUT_DIR/core_tests.log" 2>&1
}

part_server_tests() {
  local sel=(tests/server/test_openai_client.py tests/server/test_plan_identity.py)  # a real server, on the card
  [ "$MODE" = cpu ] && sel=(tests/server/test_settings.py)
  "$PY" -m pytest "${sel[@]}" -q -p no:cacheprovider --timeout 90 --basetemp "$GPU_CHECK_WORK/pytest_server" -o addopts="" -rfE \
    >"$OUT_DIR/server_tests.log" 2>&1
}

if [ -n "$RUN_PART" ]; then  # one part, in its own process group under timeout (see run_part)
  "part_$RUN_PART"
  exit $?
fi

# ---------------------------------------------------------------------------- setup

WORK=$(mktemp -d "${TMPDIR:-/tmp}/adasd-gpu-check.XXXXXX")  # scratch: bench folders, pytest temp, wheels
export GPU_CHECK_WORK=$WORK PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1  # nothing here needs the hub
unset ADASD_TEST_PAIR  # the server tests build their own pair
STATUS="$WORK/status.tsv"
: >"$MISC"
: >"$STATUS"
declare -A SKIP_REASON=()
log "mode=$MODE device=$DEVICE dtype=$DTYPE python=$PY out=$OUT_DIR"
if [ "$MODE" = cuda ] && [ -d "$REPO/.whl" ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  log "installing $(ls "$REPO"/.whl/*.whl | wc -l) carried wheels from .whl/ into $WORK/site"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
      "$REPO"/.whl/*.whl >>"$MISC" 2>&1; then
    # PYTHONPATH comes before the image's site-packages: carry only what the image lacks (scripts/gpu_wheels.sh)
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  else
    log "wheel install failed (see above)"
  fi
fi
{
  echo "--- machine"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count)
try:
    import transformers; print("transformers", transformers.__version__)
except ImportError as exc:
    print("transformers missing:", exc)
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} >"$WORK/machine.txt" 2>&1
cat "$WORK/machine.txt" >>"$MISC"

if [ "$MODE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  for p in "${PARTS[@]}"; do SKIP_REASON[$p]="torch sees no CUDA device"; done
fi
MISSING=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("fastapi", "uvicorn", "pydantic", "pydantic_settings", "typer", "rich", "httpx", "prometheus_client", "yaml")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$MISSING" ]; then
  why="missing python packages: $MISSING (carry wheels: scripts/gpu_wheels.sh)"
  for p in bench_serve core_tests server_tests; do SKIP_REASON[$p]=${SKIP_REASON[$p]:-$why}; done
fi
if [ -z "${SKIP_REASON[server_tests]:-}" ] && ! "$PY" -c "import openai, pytest" 2>/dev/null; then
  SKIP_REASON[server_tests]="missing python packages: openai or pytest (carry wheels: scripts/gpu_wheels.sh)"
fi
if [ -z "${SKIP_REASON[core_tests]:-}" ] && ! "$PY" -c "import pytest, scipy" 2>/dev/null; then
  SKIP_REASON[core_tests]="missing python packages: pytest or scipy"
fi

ADASD=("$PY" -m adasd_core.cli)

run_part step_costs "$T_STEP" step_costs.json
run_part long_context "$T_LONG" long_context.json
run_part bench_serve "$T_SERVE" bench_serve.json
run_part core_tests "$T_CORE" core_tests.log
run_part server_tests "$T_SERVER" server_tests.log

# ---------------------------------------------------------------------------- summary

MODE=$MODE DEVICE=$DEVICE DTYPE=$DTYPE "$PY" - "$STATUS" "$WORK/machine.txt" "$OUT_DIR" <<'EOF'
import json, os, sys
from pathlib import Path

status_file, machine_file, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
parts = []
for line in Path(status_file).read_text().splitlines():
    name, status, seconds, file, note = line.split("\t")
    parts.append({"part": name, "status": status, "seconds": int(seconds), "file": file, "note": note})
machine = machine_file.read_text() if machine_file.exists() else ""
summary = {"mode": os.environ["MODE"], "device": os.environ["DEVICE"], "dtype": os.environ["DTYPE"],
           "ok": all(p["status"] in ("ok", "skipped") for p in parts) and any(p["status"] == "ok" for p in parts),
           "parts": parts, "machine": machine.strip().splitlines()}

def tail_line(name):  # pytest's last line: "N passed, M failed in Xs"
    f = out / name
    lines = [l for l in f.read_text(errors="replace").splitlines() if l.strip()] if f.exists() else []
    return lines[-1].strip("= ") if lines else ""

md = [f"# gpu_check: mode {summary['mode']}, {summary['device']} / {summary['dtype']}", "",
      "| part | status | seconds | file | note |", "| --- | --- | --- | --- | --- |"]
for p in parts:
    note = p["note"] or (tail_line(p["file"]) if p["file"].endswith(".log") else "")
    md.append(f"| {p['part']} | {p['status']} | {p['seconds']} | {p['file']} | {note} |")
md += ["", "## machine", "", "```", machine.strip(), "```"]
sc = out / "step_costs.json"
if sc.exists():
    md += ["", "## step costs (median ms; cache of %d tokens)" % json.loads(sc.read_text())["context"], "",
           json.loads(sc.read_text()).get("table", "")]
lc = out / "long_context.json"
if lc.exists():
    long = json.loads(lc.read_text())
    summary["checks"] = long.get("checks", [])
    md += ["", f"## long context: {long.get('gpu', long['device'])}, {long['dtype']}, contexts {long['contexts']}", "",
           long.get("table", "")]
    if long.get("errors"):
        md += ["", "errors: " + "; ".join(f"{k}: {v}" for k, v in long["errors"].items())]
bs = out / "bench_serve.json"
if bs.exists():
    rows = json.loads(bs.read_text()).get("rows") or []
    by = {(r.get("method"), r.get("concurrency")): r for r in rows}
    levels = sorted({c for _, c in by if c is not None})
    md += ["", "## a server on the tiny pair: the planner's draft lengths by concurrency", "",
           "| clients | ar tok/s | adasd tok/s | adasd / ar | adasd mean draft length | acceptance |",
           "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in levels:
        ar, ad = by.get(("ar", c), {}), by.get(("adasd", c), {})
        spec = ad.get("speculative") or {}
        ratio = ad["tokens_per_s"] / ar["tokens_per_s"] if ar.get("tokens_per_s") and ad.get("tokens_per_s") else None
        cell = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
        md.append(f"| {c} | {cell(ar.get('tokens_per_s'))} | {cell(ad.get('tokens_per_s'))} | {cell(ratio, '{:.2f}')} | "
                  f"{cell(spec.get('mean_draft_length'), '{:.2f}')} | {cell(spec.get('acceptance_rate'), '{:.2f}')} |")
    one = (by.get(("adasd", 1), {}).get("speculative") or {}).get("mean_draft_length")
    if os.environ["MODE"] == "cuda":  # one client on a GPU: a step costs its launches, a draft step far fewer
        drafted = {"name": "bench_serve: adasd drafts at 1 client (mean draft length)", "value": one or 0.0,
                   "limit": 1.0, "ok": (one or 0.0) >= 1.0, "enforced": True}
        summary.setdefault("checks", []).append(drafted)
        summary["ok"] = summary["ok"] and drafted["ok"]
        md.append(f"\nadasd drafts at 1 client: {'yes' if drafted['ok'] else '**no**'} (mean draft length {one})")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md[: 4 + len(parts)]))
sys.exit(0 if summary["ok"] else 1)
EOF
rc=$?
rm -rf "$WORK"
exit $rc
