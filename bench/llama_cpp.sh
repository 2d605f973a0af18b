#!/usr/bin/env bash
# llama.cpp beside hypertensor, on the same GGUF, threads and token counts, in
# one run: builds llama.cpp's `llama-bench` from the source vendored in the
# `llama-cpp-python` sdist on PyPI (CPU only, -march=native, no curl, no web
# UI), runs it and `hypertensor bench local` in alternating rounds, prints
# one table with the ratio and writes it as JSON.
#
# A shared machine's speed drifts by tens of percent within minutes, so the
# engines take turns, one timed run each per round, and each ratio is the
# median over rounds of the ratio within a round.
#
# Usage: bench/llama_cpp.sh [--threads N] [--prompt-tokens N] [--decode-tokens N]
#                           [--rounds N] [--json FILE]
# Env:   LLAMA_CPP_PYTHON_VERSION (default 0.3.36), HYPERTENSOR_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."

threads=$(nproc)
prompt=64
decode=64
rounds=5
json=bench-llama-cpp.json
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --prompt-tokens) prompt=$2; shift 2 ;;
    --decode-tokens) decode=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --json) json=$2; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
cache="${HYPERTENSOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hypertensor}/llama.cpp/$version"
bench_bin="$cache/build/bin/llama-bench"
mkdir -p "$cache"

if [ ! -x "$bench_bin" ]; then
  echo "== llama.cpp $version: fetching the llama-cpp-python sdist from PyPI"
  # The JSON API names the sdist and its sha256; pip itself would try to
  # build the package's metadata first, which needs the whole toolchain.
  python3 - "$version" "$cache/sdist.tar.gz" <<'EOF'
import hashlib, json, sys, urllib.parse, urllib.request
version, dest = sys.argv[1], sys.argv[2]
api = "https://pypi.org/pypi/llama-cpp-python/json"
with urllib.request.urlopen(api, timeout=60) as r:
    meta = json.load(r)
files = meta["releases"].get(version) or sys.exit(f"llama-cpp-python {version} is not on PyPI")
sdist = next(u for u in files if u["packagetype"] == "sdist")
url = urllib.parse.urljoin(api, sdist["url"])
with urllib.request.urlopen(url, timeout=600) as r:
    data = r.read()
digest = hashlib.sha256(data).hexdigest()
if digest != sdist["digests"]["sha256"]:
    sys.exit(f"sha256 mismatch for {url}: {digest}")
open(dest, "wb").write(data)
print(f"{sdist['filename']}: {len(data)} bytes, sha256 ok")
EOF
  rm -rf "$cache/src"
  mkdir -p "$cache/src"
  tar xzf "$cache/sdist.tar.gz" -C "$cache/src" --strip-components=1

  # cmake and ninja from PyPI, so nothing is needed from the system but a C++ compiler.
  if [ ! -x "$cache/venv/bin/cmake" ]; then
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/python" -m pip install --quiet cmake ninja
  fi
  echo "== llama.cpp $version: building llama-bench (CPU, native)"
  "$cache/venv/bin/cmake" -S "$cache/src/vendor/llama.cpp" -B "$cache/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$cache/venv/bin/ninja" \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
  "$cache/venv/bin/cmake" --build "$cache/build" --target llama-bench -j "$(nproc)" >/dev/null
fi

echo "== hypertensor (release build)"
cargo build --quiet --release --locked -p cli --bin hypertensor
hypertensor="${CARGO_TARGET_DIR:-target}/release/hypertensor"
# Fetches the default model on a new machine; prints its path either way.
model=$("$hypertensor" model fetch)

echo "== $rounds rounds of llama-bench then hypertensor bench local: $threads threads, $prompt prompt tokens, $decode decode tokens"
rm -f "$cache"/round-*.json
for round in $(seq 1 "$rounds"); do
  "$bench_bin" -m "$model" -t "$threads" -p "$prompt" -n "$decode" -r 1 -o json \
    >"$cache/round-$round-llama.json"
  "$hypertensor" bench local --model "$model" --threads "$threads" \
    --prompt-tokens "$prompt" --decode-tokens "$decode" --repeats 1 \
    --json "$cache/round-$round-hypertensor.json" >/dev/null
  echo "   round $round done"
done

python3 - "$cache" "$rounds" "$json" "$version" <<'EOF'
import json, statistics, sys
cache, rounds, out, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def rate(llama, kind):
    # llama-bench reports a prompt test (n_gen 0) and a decode test (n_prompt 0).
    tests = [t for t in llama if (t["n_gen"] == 0) == (kind == "prompt")]
    return tests[0]["avg_ts"]
llama_name = f"llama.cpp (llama-cpp-python {version} sdist, native)"
# Per round: engine -> (prompt tok/s, decode tok/s).
per_round = []
for r in range(1, rounds + 1):
    llama = json.load(open(f"{cache}/round-{r}-llama.json"))
    ours = json.load(open(f"{cache}/round-{r}-hypertensor.json"))
    speeds = {llama_name: (rate(llama, "prompt"), rate(llama, "decode"))}
    speeds.update({o["engine"]: (o["prompt_tokens_per_s"], o["decode_tokens_per_s"])
                   for o in ours["rows"]})
    per_round.append(speeds)
median = statistics.median
rows = []
for engine in per_round[0]:
    row = {"engine": engine}
    for i, kind in enumerate(["prompt", "decode"]):
        row[f"{kind}_tokens_per_s"] = median(s[engine][i] for s in per_round)
        row[f"{kind}_x_llama_cpp"] = median(s[engine][i] / s[llama_name][i] for s in per_round)
        row[f"{kind}_tokens_per_s_by_round"] = [s[engine][i] for s in per_round]
    rows.append(row)
print(f"model {ours['model']} | {ours['prompt_tokens']} prompt tokens, "
      f"{ours['decode_tokens']} decode tokens, {ours['threads']} threads, "
      f"medians of {rounds} alternating rounds")
print("| engine | prompt tok/s | decode tok/s | prompt x llama.cpp | decode x llama.cpp |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {r['engine']} | {r['prompt_tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} "
          f"| {r['prompt_x_llama_cpp']:.2f} | {r['decode_x_llama_cpp']:.2f} |")
json.dump({"model": ours["model"], "threads": ours["threads"],
           "prompt_tokens": ours["prompt_tokens"], "decode_tokens": ours["decode_tokens"],
           "rounds": rounds, "baseline": llama_name, "rows": rows}, open(out, "w"), indent=2)
print(f"wrote {out}")
EOF
