#!/usr/bin/env bash
# The main job: set up what is missing, serve the bundled tiny model with
# --kv-policy retentive on 127.0.0.1 and answer one chat request.
source "$(dirname "$0")/env.sh"
exec python scripts/demo.py "$@"
