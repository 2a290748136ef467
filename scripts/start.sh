#!/usr/bin/env bash
# Builds the broker and the scheduler, then runs both on loopback with their data in one
# folder until Ctrl-C or SIGTERM, which stops both cleanly.
#
# The broker serves 127.0.0.1:7070 and the scheduler 127.0.0.1:7071. The data folder is
# ./docket-data unless DOCKET_DATA_DIR names another; the broker's file there is
# broker.redb and the scheduler's is scheduler.redb.
set -euo pipefail

cd "$(dirname "$0")/.."
data_dir=${DOCKET_DATA_DIR:-./docket-data}
binaries=${CARGO_TARGET_DIR:-target}/release

cargo build --release -p docket-broker -p docket-scheduler

"$binaries/docket-broker" --listen 127.0.0.1:7070 --data-dir "$data_dir" &
broker=$!
"$binaries/docket-scheduler" --listen 127.0.0.1:7071 --data-dir "$data_dir" \
    --broker http://127.0.0.1:7070 &
scheduler=$!

stop() {
    kill -TERM "$scheduler" "$broker" 2>/dev/null || true
}
trap stop INT TERM

# When either process exits, the other is stopped too. The script exits with the larger
# of the two exit statuses, so 0 after a clean stop.
wait -n "$broker" "$scheduler" || true
stop
broker_status=0
wait "$broker" || broker_status=$?
scheduler_status=0
wait "$scheduler" || scheduler_status=$?
exit $((broker_status > scheduler_status ? broker_status : scheduler_status))
