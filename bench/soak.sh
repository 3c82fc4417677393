#!/usr/bin/env bash
# Soak: run the fault tests (and the simulator) again and again with fresh random seeds, for as
# long as asked, and report rounds and failures. Every failing round's seed and output are kept.
# The fault tests include the race torture (three hosts hammering a few names), each of its
# rounds hammering TORTURE_SECONDS (default 30).
#   bench/soak.sh [MINUTES] [KILL_ROUNDS]      (defaults: 30 minutes, 50 kill rounds per test)
set -uo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
kill_rounds=${2:-50}
logdir=$(mktemp -d /tmp/clusterrep-soak-XXXXXX)
end=$(( $(date +%s) + minutes * 60 ))
rounds=0; failures=0
echo "soak for ${minutes} min, ${kill_rounds} kill rounds per test; logs in ${logdir}"
while [ "$(date +%s)" -lt "$end" ]; do
  rounds=$((rounds + 1))
  seed=$RANDOM$RANDOM
  if CLUSTERREP_SEED=$seed CLUSTERREP_KILL_ROUNDS=$kill_rounds HYPOTHESIS_PROFILE=soak \
     CLUSTERREP_TORTURE_SECONDS=${TORTURE_SECONDS:-30} \
     python3 -m pytest -q -x tests/faults tests/property >"${logdir}/round-${rounds}.log" 2>&1; then
    rm -f "${logdir}/round-${rounds}.log"
    echo "round ${rounds}: ok (seed ${seed})"
  else
    failures=$((failures + 1))
    echo "round ${rounds}: FAILED (seed ${seed}), see ${logdir}/round-${rounds}.log"
  fi
  python3 -m clusterrep sim --runs 50 --seed "$seed" >/dev/null 2>"${logdir}/sim-${rounds}.log" \
    && rm -f "${logdir}/sim-${rounds}.log" \
    || { failures=$((failures + 1)); echo "round ${rounds}: simulator FAILED (seed ${seed})"; }
done
echo "soak: ${rounds} rounds, ${failures} failures"
[ "$failures" -eq 0 ]
