#!/usr/bin/env bash
# Replaces the running containers of a compose service with new ones from the current compose file
# and environment, the new ones first, so that no call fails on the way:
#   scripts/rollout.sh SERVICE [COMPOSE_FLAGS...]
#   e.g. CONVSERVE_MAX_BATCH_SIZE=16 scripts/rollout.sh replica --profile scale
# `compose up -d` after a config change stops every replica before it starts the new ones: calls
# fail in between (the load balancer has nowhere to send them). This scales SERVICE to twice its
# count without recreating (the new containers get the new settings), waits until they are healthy,
# then stops the old ones (each drains its calls: SIGTERM, then up to ROLLOUT_STOP_S, the compose
# file's stop_grace_period) and removes them. The load balancer follows through DNS.
# COMPOSE and ENGINE name the commands (default "docker compose" and docker; for podman, what
# `scripts/container-engine.sh env` prints).
set -euo pipefail
service=${1:?usage: scripts/rollout.sh SERVICE [COMPOSE_FLAGS...]}
shift
cd "$(dirname "$0")/.."
read -r -a compose <<<"${COMPOSE:-docker compose}"
compose+=("$@")
engine=${ENGINE:-docker}

running() {
  local id
  for id in $("${compose[@]}" ps -q "$service"); do
    [ "$("$engine" inspect --format '{{.State.Running}}' "$id")" = true ] && echo "$id"
  done | sort
}

mapfile -t old < <(running)
[ ${#old[@]} -gt 0 ] || { echo "rollout: no running $service container" >&2; exit 1; }
echo "rollout: $service: starting ${#old[@]} new container(s) beside the ${#old[@]} running"
"${compose[@]}" up -d --no-deps --no-recreate --scale "$service=$((2 * ${#old[@]}))" "$service"
mapfile -t new < <(comm -13 <(printf '%s\n' "${old[@]}") <(running))
deadline=$((SECONDS + ${ROLLOUT_TIMEOUT_S:-180}))
for id in "${new[@]}"; do
  until [ "$("$engine" inspect --format '{{.State.Health.Status}}' "$id")" = healthy ]; do
    # podman without systemd runs no HEALTHCHECK by itself.
    if [ "$engine" = podman ]; then podman healthcheck run "$id" >/dev/null 2>&1 || true; fi
    if [ $SECONDS -ge $deadline ]; then
      echo "rollout: $id is not healthy; the old containers keep serving beside it" >&2
      exit 1
    fi
    sleep 1
  done
done
echo "rollout: $service: new containers healthy; stopping the old ones"
"$engine" stop --time "${ROLLOUT_STOP_S:-15}" "${old[@]}" >/dev/null
"$engine" rm "${old[@]}" >/dev/null
echo "rollout: $service: done"
