#!/usr/bin/env bash
# Start a visdom server in the background unless one already answers on the port.
#   bash tools/start_visdom.sh [PORT]          # PORT defaults to 8097
# It listens on loopback only (reach it from another machine through an SSH tunnel:
# ssh -L PORT:localhost:PORT HOST), logs to $VISDOM_LOG (default checkpoints/visdom.log), keeps
# its envs in $VISDOM_ENV_PATH (default checkpoints/visdom_envs), and stays up after training ends.
# Live plots are optional: when the server cannot start this says why and still exits 0, so that
# training goes on. Stop it with: kill "$(cat "$VISDOM_LOG.pid")"
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${1:-8097}
LOG=${VISDOM_LOG:-checkpoints/visdom.log}
ENV_PATH=${VISDOM_ENV_PATH:-checkpoints/visdom_envs}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    echo "start_visdom.sh: port must be a number from 1 to 65535, got '$PORT'" >&2
    exit 2
fi
url="http://localhost:$PORT"

# 0: a visdom server answers; 1: nothing listens; 2: something else listens on the port.
probe() {
    "$PY" - "$PORT" <<'EOF'
import sys, urllib.request, urllib.error
try:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    page = opener.open(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2).read(20000).decode("utf-8", "replace")
    sys.exit(0 if "<title>visdom</title>" in page else 2)
except urllib.error.HTTPError:
    sys.exit(2)
except Exception:
    sys.exit(1)
EOF
}

status=0; probe || status=$?
if [ "$status" = 0 ]; then
    echo "visdom: already running at $url"
    exit 0
elif [ "$status" = 2 ]; then
    echo "warning: port $PORT is taken by something that is not visdom; no live plots (choose another port with --visdom_port)" >&2
    exit 0
fi

# The front-end files must be local, or the server would try to fetch them from CDNs.
if ! "$PY" tools/visdom_assets.py >/dev/null; then
    echo "warning: visdom's front-end files are incomplete (see above); no live plots, training goes on" >&2
    exit 0
fi

mkdir -p "$(dirname "$LOG")" "$ENV_PATH"
echo "--- $(date '+%F %T') starting visdom on 127.0.0.1:$PORT" >>"$LOG"
# A new session: closing the terminal or pressing Ctrl-C in the training leaves it running.
"$PY" - "$PORT" "$ENV_PATH" "$LOG" >"$LOG.pid" <<'EOF'
import os, subprocess, sys
port, env_path, log = sys.argv[1:]
with open(log, "ab") as out:
    server = subprocess.Popen(
        [sys.executable, "-m", "visdom.server", "-port", port, "-bind_local", "-env_path", env_path,
         "-logging_level", "WARNING"],
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
print(server.pid)
EOF

for _ in $(seq 100); do
    status=0; probe || status=$?
    if [ "$status" = 0 ]; then
        echo "visdom: started at $url (loopback only; log: $LOG)"
        echo "visdom: from another machine: ssh -L $PORT:localhost:$PORT ${HOSTNAME:-HOST}, then open $url"
        exit 0
    fi
    kill -0 "$(cat "$LOG.pid")" 2>/dev/null || break
    sleep 0.2
done
echo "warning: visdom did not start on port $PORT (last lines of $LOG below); training goes on without live plots" >&2
tail -n 5 "$LOG" >&2 || true
exit 0
