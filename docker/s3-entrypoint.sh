#!/bin/sh
# Start `weed mini` with one identity from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket
# S3_BUCKET (created if missing). Data in /data; S3 on :8333 on every interface of the container.
set -eu
: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY}"
config=/data/.s3.json
umask 077
printf '{"identities":[{"name":"nucseg","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
  "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" > "$config"
exec /opt/weed/bin/weed mini -dir=/data -ip=127.0.0.1 -ip.bind=0.0.0.0 -s3.port=8333 \
  -bucket="${S3_BUCKET:-nucseg}" -s3.config="$config" -webdav=false -admin.ui=false "$@"
