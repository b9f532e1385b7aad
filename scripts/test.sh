#!/usr/bin/env bash
# The tests: set up what is missing, run the linter and the format check (ruff.toml), then
# pytest (the default tier; pass -m slow or other pytest arguments to change it).  pytest's
# exit 5 (no tests ran) fails.
source "$(dirname "$0")/env.sh"
ruff check .
ruff format --check .
set +e
python -m pytest "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
fi
exit "$status"
