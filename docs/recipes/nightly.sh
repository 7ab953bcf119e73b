#!/usr/bin/env bash
# Nightly bulk-explain audit from plain cron (docs/scheduling.md).
#
#   # crontab -e on a machine that reaches the cluster's Jobs API (02:15 UTC every night)
#   15 2 * * *  cd /srv/bulk-explain && RAY_AUTH_TOKEN_PATH=/etc/bulk-explain/ray-token \
#               INPUT=s3://data/pets/ OUTPUT=s3://audits/pets/ docs/recipes/nightly.sh >> /var/log/bulk-explain.log 2>&1
#
# Environment:
#   INPUT, OUTPUT           the dataset and the output the audit keeps up to date (required)
#   RAY_API_SERVER_ADDRESS  the cluster's Jobs API (default http://127.0.0.1:8265, e.g. through
#                           `ray dashboard cluster.yaml` or an SSH tunnel)
#   RAY_AUTH_TOKEN_PATH     the cluster's token (default ~/.ray/auth_token); auth is always on
#   SUBMISSION_ID           default bulk-explain-YYYY-MM-DD (UTC): the cluster refuses a second
#                           submission with the same id, so a retried or doubled cron line on the
#                           same day does not start a second job
#   BULK_EXPLAIN_ARGS       model and tuning flags (default: VGG16 with ImageNet weights)
#   WAIT_FOR_LEASE          seconds to wait if last night's run still holds OUTPUT (default 0:
#                           exit 4 at once, "output is busy", and let the next night catch up)
#
# Exit status: that of `ray job submit`, which waits for the job: 0 when it succeeded.
set -euo pipefail
: "${INPUT:?set INPUT to the dataset (folder or s3:// prefix)}"
: "${OUTPUT:?set OUTPUT to the audit output (folder or s3:// prefix)}"
export RAY_AUTH_MODE=token
address="${RAY_API_SERVER_ADDRESS:-http://127.0.0.1:8265}"
submission_id="${SUBMISSION_ID:-bulk-explain-$(date -u +%F)}"
# shellcheck disable=SC2086  # BULK_EXPLAIN_ARGS is a list of flags
exec ray job submit --address "$address" --submission-id "$submission_id" --working-dir . -- \
    python -m bulk_explain run --input "$INPUT" --output "$OUTPUT" --address auto \
    --wait-for-lease "${WAIT_FOR_LEASE:-0}" ${BULK_EXPLAIN_ARGS:---model vgg16 --weights imagenet}
