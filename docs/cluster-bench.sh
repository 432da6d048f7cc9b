#!/usr/bin/env bash
# Throughput of one twind against a three-node cluster on this machine, in
# one run: twinsim bench against a single twind, then against the cluster
# through its owner and through a standby. Run from the repository root:
#
#   bash docs/cluster-bench.sh [devices] [duration]
set -euo pipefail
devices=${1:-1000}
duration=${2:-15s}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
go build -o "$work/twind" ./server/cmd/twind
go build -o "$work/twinsim" ./clients/twinsim
go build -o "$work/twinctl" ./clients/twinctl
bench() { "$work/twinsim" bench --addr "$1" --devices "$devices" --duration "$duration" | grep -A3 '^devices'; }

echo "== one twind"
"$work/twind" --addr 127.0.0.1:50061 --data "$work/single" 2>"$work/single.log" &
pid=$!
sleep 3
bench 127.0.0.1:50061
kill "$pid"; wait "$pid" || true

for i in 1 2 3; do
  peers=""
  for j in 1 2 3; do [ "$j" != "$i" ] && peers="$peers,127.0.0.1:730$j"; done
  "$work/twind" --node "n$i" --addr "127.0.0.1:5007$i" --data "$work/n$i" \
    --cluster-listen "127.0.0.1:730$i" --cluster-peers "${peers#,}" 2>"$work/n$i.log" &
  pids+=($!)
done
owner=
for _ in $(seq 1 60); do
  owner=$("$work/twinctl" --addr 127.0.0.1:50071 cluster status 2>/dev/null | awk '/^owner:/{print $2}') || true
  [ -n "$owner" ] && [ "$owner" != none ] && break
  sleep 1
done
echo "== cluster, devices on the owner $owner"
bench "127.0.0.1:5007${owner#n}"
standby=$(( ${owner#n} % 3 + 1 ))
echo "== cluster, devices on standby n$standby (forwarded)"
bench "127.0.0.1:5007$standby"
