#!/usr/bin/env bash
# A local 3-node factum cluster: one etcd, one control plane, three agents and one KV provider host, each a
# separate process, logs under ./cluster-logs/. Every factum connection is mutual TLS, with certificates made here
# (cluster-logs/certs). The KV provider host registers in etcd under a lease of its own and the agents send KV
# calls to the hosts they find there (`--provider-from-registry kv`), so guests on every node share one store; the
# host checks each call's grant against the control plane's seal.
# Ctrl-C stops everything. Needs `etcd` (apt install etcd-server).
#
#   scripts/cluster.sh                 # build (release) and run
#   export FACTUM_TLS=cluster-logs/certs   # in another terminal: the CLI calls as operator/local over TLS
#   factum nodes / ps / start ...      # (cargo run --release -- nodes)
#   kill -9 $(cat cluster-logs/agent-n2.pid)   # lose a node: its `always` instances move within ~TTL
#   kill -9 $(cat cluster-logs/provider-kv-1.pid)   # lose the KV host: KV calls are PROVIDER_UNAVAILABLE
#   factum provider kv --id kv-2 --listen 127.0.0.1:7802 --etcd 127.0.0.1:2379   # another host: found within 1 s
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || { echo "error: etcd not found (apt-get install etcd-server)" >&2; exit 1; }
cargo build --release --quiet
factum=./target/release/factum
logs=cluster-logs
rm -rf "$logs" && mkdir -p "$logs"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

etcd --name factum --data-dir "$logs/etcd-data" \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster factum=http://127.0.0.1:2380 >"$logs/etcd.log" 2>&1 &
pids+=($!)
until (exec 3<>/dev/tcp/127.0.0.1/2379) 2>/dev/null; do sleep 0.1; done

# A CA, the control plane's and operator/local's certificates, and one per node.
$factum certs init --dir "$logs/certs" >/dev/null
$factum certs issue node/n1 node/n2 node/n3 provider/kv-1 provider/kv-2 --dir "$logs/certs" >/dev/null
export FACTUM_TLS="$logs/certs"

$factum control-plane --listen 127.0.0.1:7700 --etcd 127.0.0.1:2379 >"$logs/control-plane.log" 2>&1 &
pids+=($!)
echo $! >"$logs/control-plane.pid"
$factum provider kv --id kv-1 --listen 127.0.0.1:7801 --etcd 127.0.0.1:2379 >"$logs/provider-kv-1.log" 2>&1 &
pids+=($!)
echo $! >"$logs/provider-kv-1.pid"
for i in 1 2 3; do
    $factum agent --node-id "n$i" --agent-listen "127.0.0.1:771$i" --control-plane 127.0.0.1:7700 \
        --etcd 127.0.0.1:2379 --lease-ttl 3s --provider-from-registry kv >"$logs/agent-n$i.log" 2>&1 &
    pids+=($!)
    echo $! >"$logs/agent-n$i.pid"
done
sleep 2
$factum nodes
echo "cluster up: control plane 127.0.0.1:7700, etcd 127.0.0.1:2379, KV provider host 127.0.0.1:7801,"
echo "logs in $logs/ (Ctrl-C stops it)"
wait
