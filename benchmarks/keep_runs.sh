#!/usr/bin/env bash
# Commit the long benchmarks' finished runs as they land, so that a machine that ends without
# warning loses only the runs in flight. focalmix_ssl.py, seg_methods.py and ad_settings.py keep
# one file per finished run in benchmarks/results/<name>_runs/ and redraw their report after each
# (docs/how-to/run-benchmarks.md, "Long benchmarks across machines"). Every INTERVAL_S seconds
# (default 60), if any of those files changed, this commits them, and only them: whatever else is
# staged or edited in the checkout stays out of the commit.
#
#   benchmarks/keep_runs.sh [INTERVAL_S] &     # beside the benchmark, from any directory
set -uo pipefail
cd "$(dirname "$0")/.."
interval=${1:-60}
results=benchmarks/results
watched=()
for name in focalmix_ssl seg_methods ad_settings; do
    watched+=("$results/$name.json" "$results/$name.md" "$results/$name.png" "$results/${name}_runs")
done

while true; do
    sleep "$interval"
    present=()
    for path in "${watched[@]}"; do
        [ -e "$path" ] && present+=("$path")
    done
    [ ${#present[@]} -eq 0 ] && continue
    [ -z "$(git status --porcelain -- "${present[@]}")" ] && continue
    sleep 5 # a benchmark writes its run file, then its report: let it finish
    git add -- "${present[@]}" || continue
    runs=$(git diff --cached --name-only --diff-filter=A -- "${present[@]}" | grep '_runs/' |
        sed 's|.*/||; s|\.json$||; s|\.csv\.gz$||' | paste -sd, -)
    git commit -q -m "Long benchmarks: runs finished (${runs:-reports redrawn})" -- "${present[@]}" ||
        echo "keep_runs: commit failed at $(date)" >&2
done
