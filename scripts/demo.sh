#!/usr/bin/env bash
# The main job: set up what is missing, serve SmolLM2-135M-Instruct with --kv-policy retentive
# on 127.0.0.1, ask it about a long text and print what compression did for that request.
# Options (--policy, --budget, --document, --question): bash scripts/demo.sh --help
source "$(dirname "$0")/env.sh"
exec python -m retentivekv_vllm.demo "$@"
