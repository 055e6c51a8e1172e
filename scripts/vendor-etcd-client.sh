#!/usr/bin/env bash
# Rebuilds vendor/etcd-client: the crates.io etcd-client with its gRPC code generated once and checked in, so that
# building factum needs no protoc (etcd-client's build script runs protoc on every fresh build). Needs protoc
# and network access; run it when moving to another etcd-client version, then build and test.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-0.21.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A throwaway crate that builds the published etcd-client, so its build script generates the code.
mkdir -p "$work/gen/src"
printf '[package]\nname = "gen"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\netcd-client = "=%s"\n[workspace]\n' \
    "$version" > "$work/gen/Cargo.toml"
echo > "$work/gen/src/lib.rs"
cargo build --quiet --manifest-path "$work/gen/Cargo.toml" --target-dir "$work/target"
src=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 1 -mindepth 1 -type d | while read -r d; do
    [ -d "$d/etcd-client-$version" ] && echo "$d/etcd-client-$version"; done | sed -n 1p)
out=$(dirname "$(find "$work/target/debug/build" -path '*etcd-client-*/out/etcdserverpb.rs' | sed -n 1p)")

rm -rf vendor/etcd-client
mkdir -p vendor/etcd-client/src/rpc/generated
cp -r "$src/src" vendor/etcd-client/
cp "$src/LICENSE-MIT" "$src/LICENSE-APACHE" "$src/README.md" vendor/etcd-client/
for proto in authpb etcdserverpb mvccpb v3electionpb v3lockpb; do
    cp "$out/$proto.rs" vendor/etcd-client/src/rpc/generated/
done
sed -i 's|tonic::include_proto!("\([a-z0-9]*\)");|include!("generated/\1.rs");|' vendor/etcd-client/src/rpc/pb.rs
# The published manifest without the build script, examples, tests and their dependencies.
awk '
    /^build = "build.rs"$/ { next }
    /^\[\[(example|test)\]\]$/ || /^\[(dev-dependencies|build-dependencies)/ { skip = 1; next }
    /^\[/ { skip = 0 }
    !skip
' "$src/Cargo.toml" > vendor/etcd-client/Cargo.toml
echo "vendor/etcd-client: etcd-client $version with generated code from $(protoc --version)"
