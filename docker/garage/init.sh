#!/bin/sh
# garage-init: prepares the single Garage node of compose.yaml for Synapse and media-proxy,
# then exits 0. Safe to run again: each step checks first.
#   1. gives the node a role in the cluster layout and applies it (a new cluster has none);
#   2. creates the access key GARAGE_KEY_NAME and the bucket S3_BUCKET, and grants the key
#      read/write on it;
#   3. writes the key to GARAGE_KEY_FILE (S3_ACCESS_KEY_ID=..., S3_SECRET_ACCESS_KEY=...),
#      on a volume that Synapse's entrypoint reads to render homeserver.yaml.
# It runs in the garage container's network namespace (network_mode: service:garage) with
# Garage's config and metadata volume, so `garage` talks to the node at 127.0.0.1:3901 as it
# would on the node itself; GARAGE_RPC_SECRET comes from the environment.
#
# Checked against Garage v2's CLI source (src/garage/cli/remote/{layout,key}.rs and the
# format_table crate), not against a running Garage (no Docker engine here):
#   `layout show` prints "Current cluster layout version: N"; `layout assign NODE -z ZONE
#   -c SIZE` takes a byte size (1G, 10G...); `layout apply --version N+1`; `key info
#   --show-secret` prints "Key ID:", "Secret key:" rows padded with spaces (no indent).
# Unverified: that `key create NAME` still takes the name as a positional argument in v2 (it
# does in v1, and v2 examples use it so), and the exit status of `key info`/`bucket info`
# for a missing key or bucket (assumed non-zero, as for any CLI error).
set -eu

bucket=${S3_BUCKET:-matrix}
key_name=${GARAGE_KEY_NAME:-matrix-media}
key_file=${GARAGE_KEY_FILE:-/garage-keys/s3.env}
capacity=${GARAGE_CAPACITY:-10G}

log() { echo "garage-init: $*" >&2; }

tries=0
until garage status >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 60 ] || { log "garage does not answer"; garage status; exit 1; }
    sleep 1
done

# A new cluster has layout version 0; if the version cannot be read, fall back to whether
# the node still shows no role.
version=$(garage layout show | sed -n 's/^Current cluster layout version:[[:space:]]*\([0-9][0-9]*\).*/\1/p')
if [ -n "$version" ]; then
    [ "$version" = 0 ] && needs_layout=yes || needs_layout=no
elif garage status | grep -q 'NO ROLE ASSIGNED'; then
    needs_layout=yes
    version=0
else
    needs_layout=no
fi
if [ "$needs_layout" = yes ]; then
    node=$(garage node id -q | cut -d@ -f1)
    log "assigning node $(printf '%.16s' "$node") a role, capacity $capacity"
    garage layout assign -z dc1 -c "$capacity" "$node"
    garage layout apply --version $((version + 1))
fi

if ! garage key info "$key_name" >/dev/null 2>&1; then
    log "creating key $key_name"
    garage key create "$key_name" >/dev/null
fi
if ! garage bucket info "$bucket" >/dev/null 2>&1; then
    log "creating bucket $bucket"
    garage bucket create "$bucket"
fi
garage bucket allow --read --write --owner "$bucket" --key "$key_name"

info=$(garage key info --show-secret "$key_name")
key_id=$(printf '%s\n' "$info" | sed -n 's/^Key ID:[[:space:]]*//p' | head -n 1)
secret=$(printf '%s\n' "$info" | sed -n 's/^Secret key:[[:space:]]*//p' | head -n 1)
if [ -z "$key_id" ] || [ -z "$secret" ]; then
    log "cannot read the key from 'garage key info':"
    printf '%s\n' "$info" >&2
    exit 1
fi

umask 077
mkdir -p "$(dirname "$key_file")"
tmp="$key_file.tmp"
printf 'S3_ACCESS_KEY_ID=%s\nS3_SECRET_ACCESS_KEY=%s\n' "$key_id" "$secret" > "$tmp"
mv "$tmp" "$key_file"
log "key $key_id can use bucket $bucket; written to $key_file"
