#!/bin/sh
# All of streamd's benchmark scenarios, from one command; writes bench/RESULTS.md.
# Options are passed on: --smoke (10 s, for CI), --only sustained,burst,...
cd "$(dirname "$0")/.." && exec python3 bench/run.py "$@"
