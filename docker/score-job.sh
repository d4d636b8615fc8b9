#!/bin/sh
# The compose `score` profile's job: `python -m serving score ARGS...`, run as the owner of the
# output folder. Started as root only for this: when ./scores did not exist the engine created it
# for the bind mount as root, and the job (uid 10001) could not write there. Such a folder is given
# to the owner of the input folder (the user who made the images), else to convserve (10001).
set -eu
out=${SCORE_OUT_DIR:-/data/out}
in=${SCORE_IN_DIR:-/data/in}
if [ "$(id -u)" != 0 ]; then
  exec python -m serving "$@"
fi
owner=$(stat -c %u:%g "$out")
if [ "${owner%%:*}" = 0 ]; then
  owner=$(stat -c %u:%g "$in")
  [ "${owner%%:*}" != 0 ] || owner=10001:10001
  chown "$owner" "$out"
fi
exec setpriv --reuid="${owner%%:*}" --regid="${owner##*:}" --clear-groups -- python -m serving "$@"
