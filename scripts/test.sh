#!/usr/bin/env bash
# The tests: set up what is missing, then run pytest (the default tier; pass -m slow
# or other pytest arguments to change it).  pytest's exit 5 (no tests ran) fails.
source "$(dirname "$0")/env.sh"
set +e
python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
fi
exit "$status"
