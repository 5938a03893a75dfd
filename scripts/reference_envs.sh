#!/usr/bin/env bash
# Builds the reference environments that the parity tests compare our experts against (docs/parity.md),
# once per machine: each is a virtual environment holding the package published with the paper, kept in
#   ${T2I_REFERENCE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/t2i-reward/reference}/<name>
# A finished environment holds a marker (.complete) with the fingerprint of the recipe that built it; an
# environment without it (a build that was interrupted or failed) or built by another recipe is removed and
# built again, never trusted. A second run with everything built takes about a second.
# Usage: scripts/reference_envs.sh [NAME...]   NAME: imagereward, hpsv2, hpsv3 (default: all three)
# The recipes are ../shared/reference/<name>/setup_env.sh, beside the repository, or scripts/reference/<name>/
# in it (hpsv3's).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
shared=$root/../shared/reference
cache=${T2I_REFERENCE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/t2i-reward/reference}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(imagereward hpsv2 hpsv3)
mkdir -p "$cache"

# what each environment must import once built (the modules the reference scripts load)
smoke_test() {
    case $1 in
        imagereward) "$2" -c "import sys; sys.argv = ['x']; import transformers, clip, ImageReward, ImageReward.utils" ;;
        hpsv2) "$2" -c "import hpsv2.img_score, hpsv2.src.open_clip.factory" ;;
        hpsv3) "$2" -c "import hpsv3.inference, transformers; assert transformers.__version__ == '4.45.2'" ;;
        *) echo "unknown reference environment: $1 (known: imagereward, hpsv2, hpsv3)" >&2; return 2 ;;
    esac
}

build() {  # build() NAME: builds one environment unless it is complete; exits non-zero when the build fails
    local name=$1 recipe=$shared/$1/setup_env.sh env=$cache/$1 log=$cache/$1.log fingerprint start
    [ -f "$recipe" ] || recipe=$root/scripts/reference/$1/setup_env.sh  # the recipes kept in the repository
    if [ ! -f "$recipe" ]; then
        echo "reference recipe $recipe not found (is ../shared/reference beside the repository?)" >&2
        return 1
    fi
    fingerprint=$(sha256sum <"$recipe" | cut -c1-16)  # a changed recipe makes a different environment
    (
        # one build at a time per environment: two test runs on one machine must not build into one folder
        flock 9
        if [ "$(cat "$env/.complete" 2>/dev/null)" = "$fingerprint" ]; then
            echo "reference $name: ready in $env"
            exit 0
        fi
        echo "reference $name: building in $env (a few minutes, about 6 GB; log: $log)"
        rm -rf "$env"
        start=$SECONDS
        if ! bash "$recipe" "$env" >"$log" 2>&1 || ! smoke_test "$name" "$env/bin/python" >>"$log" 2>&1; then
            echo "reference $name: build failed; the last lines of $log:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        echo "$fingerprint" >"$env/.complete"
        echo "reference $name: built in $((SECONDS - start)) s"
    ) 9>"$cache/$name.lock"
}

# the builds run side by side: each is mostly one pip process unpacking wheels, one core each
pids=()
for name in "${names[@]}"; do
    build "$name" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
exit $status
