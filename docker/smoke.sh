#!/usr/bin/env bash
# Build the CPU image (and the GPU image where Docker has the NVIDIA runtime), serve the bundled
# tiny model with --kv-policy retentive, ask it one question, read the plugin's metrics, stop.
# Without a Docker daemon it says so and exits 0: CI without Docker still lints the Dockerfiles
# (tests/test_docker.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info > /dev/null 2>&1; then
  echo "docker/smoke.sh: skipped: no Docker daemon is reachable (docker info failed)"
  exit 0
fi

PORT=${PORT:-18000}
# SMOKE_NETWORK=host: build and run on the host's network (loopback only), for daemons whose
# bridge has no route out (the CPU image's build installs from PyPI).
build_flags=() run_flags=(-p "127.0.0.1:$PORT:8000") serve_at=(--host 0.0.0.0 --port 8000)
if [ "${SMOKE_NETWORK:-}" = host ]; then
  build_flags=(--network host) run_flags=(--network host) serve_at=(--host 127.0.0.1 --port "$PORT")
fi
# SMOKE_BUILD_ARGS: more `docker build` arguments, e.g. where torch's +cpu wheel comes from
# (see docker/Dockerfile.cpu).
read -r -a extra_build_args <<< "${SMOKE_BUILD_ARGS:-}"
build_flags+=("${extra_build_args[@]}")
kinds=(cpu)
if docker info --format '{{json .Runtimes}}' | grep -q nvidia; then
  kinds+=(gpu)
fi

for kind in "${kinds[@]}"; do
  image="retentivekv-vllm:smoke-$kind"
  echo "== building $image"
  docker build "${build_flags[@]}" -f "docker/Dockerfile.$kind" -t "$image" .
  name="retentivekv-smoke-$kind-$$"
  gpu_flags=()
  [ "$kind" = gpu ] && gpu_flags=(--gpus all)
  # The tiny model is built inside the container from the fixtures shipped with the package.
  # vLLM's engine and workers talk through /dev/shm: Docker's default 64 MiB is too small.
  docker run -d --name "$name" --shm-size 1g "${gpu_flags[@]}" "${run_flags[@]}" --entrypoint bash "$image" -c \
    "python3 -m retentivekv_vllm.fixtures build --arch llama --out /home/vllm/tiny-llama \
     && exec vllm serve /home/vllm/tiny-llama ${serve_at[*]} --kv-policy retentive --kv-budget 0.2 \
        --dtype float32 --enforce-eager --max-model-len 2048 --kv-cache-memory-bytes 268435456"
  trap 'docker rm -f "$name" > /dev/null 2>&1 || true' EXIT
  echo "== waiting for $name"
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
    if [ "$(docker inspect -f '{{.State.Running}}' "$name")" != true ]; then
      docker logs "$name" | tail -50
      echo "docker/smoke.sh: $image exited before it was ready" >&2
      exit 1
    fi
    sleep 2
  done
  prompt=$(python3 -c 'print(" ".join(f"Sentence {i}: the river ran past the mill." for i in range(40)))')
  curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"/home/vllm/tiny-llama\", \"prompt\": \"$prompt\", \"max_tokens\": 8}" | tee /dev/stderr \
    | grep -q '"finish_reason"'
  sleep 3  # the plugin's metrics refresh once a second
  curl -sf "http://127.0.0.1:$PORT/metrics" | grep '^retentivekv:tokens_folded_total' \
    | awk '{ if ($2 > 0) found = 1 } END { exit !found }'
  echo "== $image: answered, and /metrics shows folded tokens"
  docker rm -f "$name" > /dev/null
  trap - EXIT
done
echo "docker/smoke.sh: passed (${kinds[*]})"
