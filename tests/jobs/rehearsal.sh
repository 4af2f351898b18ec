#!/usr/bin/env bash
# The multi-node rehearsal's cluster and job, run by tests/jobs/test_submitted_job.py in a private PID
# namespace (so `ray stop` touches nothing else, and whatever this starts dies with the namespace).
#   in:  PY (python), ROOT (the checkout), CONFIG (run config), TEMP (short temp dir), GCS, DASH (ports)
#   out: NODE_RETRY / NODE_FAILED lines with the tails of the nodes' logs when a node does not come up;
#        the job's logs; JOB_RC; the run's failure log; NODES {actor class: [node ids]}
set -u
RAY="$(dirname "$PY")/ray"
export RAY_ADDRESS="http://127.0.0.1:$DASH"

port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

own_ports() {  # every node's agents on free ports: the test session's own Ray holds the defaults
  echo "--dashboard-agent-listen-port=$(port) --dashboard-agent-grpc-port=$(port)" \
       "--runtime-env-agent-port=$(port) --metrics-export-port=$(port) --ray-client-server-port=$(port)"
}

logs() {  # why a node did not come up: the tails of the GCS's and the raylets' logs
  for f in "$TEMP"/session_latest/logs/gcs_server.* "$TEMP"/session_latest/logs/raylet.* \
           "$TEMP"/*/session_latest/logs/raylet.*; do
    [ -f "$f" ] && { echo "--- $f"; tail -n 15 "$f"; }
  done
}

alive() {  # wait up to $2 s until the cluster has an alive node with the resource node_$1 (the head's
  # dashboard answers too)
  "$PY" - "http://127.0.0.1:$DASH" "node_$1" "$2" <<'EOF'
import sys, time
from ray.util.state import list_nodes
want, deadline = sys.argv[2], time.time() + float(sys.argv[3])
while time.time() < deadline:
    try:
        if any(want in n.resources_total for n in list_nodes(address=sys.argv[1],
                                                             filters=[("state", "=", "ALIVE")])):
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
EOF
}

start_worker() {  # name; each attempt its own temp dir (as on its own machine)
  for attempt in 1 2; do
    # shellcheck disable=SC2046
    "$RAY" start --address="127.0.0.1:$GCS" --num-cpus=1 --resources="{\"node_$1\": 1}" \
        --temp-dir="$TEMP/$1$attempt" $(own_ports) > "$TEMP/start-$1-$attempt.log" 2>&1
    # `ray start` gives a raylet a fixed 30 s to register; on a busy machine it may register later
    alive "$1" 90 && return 0
    echo "NODE_RETRY $1 (attempt $attempt): $(tail -n 2 "$TEMP/start-$1-$attempt.log" | tr '\n' ' ')"
  done
  echo "NODE_FAILED $1"
  logs
  return 1
}

# shellcheck disable=SC2046
"$RAY" start --head --port="$GCS" --num-cpus=1 --resources='{"node_head": 1}' --temp-dir="$TEMP" \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --disable-usage-stats $(own_ports) \
    > "$TEMP/start-head.log" 2>&1
if ! alive head 120; then  # the head, its dashboard up, before the workers add to the load
  echo "NODE_FAILED head: $(tail -n 3 "$TEMP/start-head.log" | tr '\n' ' ')"
  logs
  "$RAY" stop --force >/dev/null 2>&1
  exit 1
fi
start_worker a & a=$!  # the two workers side by side, as two machines would join
start_worker b & b=$!
if ! { wait $a && wait $b; }; then
  "$RAY" stop --force >/dev/null 2>&1
  exit 1
fi
for try in $(seq 60); do  # the job agent answers a few seconds after `ray start` returns
  "$RAY" job submit --submission-id rehearsal --no-wait --working-dir "$ROOT" -- \
      "$PY" -m jobs.pipeline --config "$CONFIG" --json >/dev/null 2>&1 && break
  sleep 1
done
"$RAY" job logs --follow rehearsal
"$RAY" job status rehearsal 2>&1 | grep -qi succeeded
echo "JOB_RC $?"
failure=$(ls -t "$TEMP"/session_*/runtime_resources/working_dir_files/*/runs/multinode/logs/failure-*.log \
    2>/dev/null | head -1)
[ -n "$failure" ] && tail -n 40 "$failure"
"$PY" - "http://127.0.0.1:$DASH" <<'EOF'
import json, sys
from ray.util.state import list_actors
actors = list_actors(address=sys.argv[1], detail=True, limit=5000, raise_on_missing_output=False)
nodes = {}
for a in actors:
    if a.class_name and a.node_id:
        nodes.setdefault(a.class_name, set()).add(a.node_id)
print("NODES " + json.dumps({k: sorted(v) for k, v in nodes.items()}))
EOF
"$RAY" stop --force >/dev/null 2>&1
exit 0
