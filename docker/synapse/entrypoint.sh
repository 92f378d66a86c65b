#!/bin/sh
# Writes /data/homeserver.yaml (unless SYNAPSE_RENDER_CONFIG=0), makes sure the signing key and
# the media store exist with Synapse's ownership, then hands over to the image's /start.py,
# which drops to UID:GID (991:991 by default) and runs Synapse.
set -eu

config=${SYNAPSE_CONFIG_PATH:-/data/homeserver.yaml}
# UID and GID are the synapse image's environment variables (as /start.py reads them).
# shellcheck disable=SC3028
owner="${UID:-991}:${GID:-991}"

if [ "${SYNAPSE_RENDER_CONFIG:-1}" != 0 ]; then
    python /conf/media-proxy/configure.py \
        /conf/media-proxy/homeserver.yaml.template "$config"
fi

# A fresh named volume mounted at /data/media_store belongs to root; /start.py only chowns
# /data itself. media-proxy (same uid) writes here too.
mkdir -p /data/media_store
chown "$owner" /data /data/media_store "$config"
chmod 0640 "$config"

# Generate the signing key (and any other missing key file) once; exits when done.
if [ ! -e /data/signing.key ]; then
    python -m synapse.app.homeserver --config-path "$config" --generate-keys
    chown "$owner" /data/signing.key
fi

exec /start.py "$@"
