#!/usr/bin/env bash
# farm's main job on one machine (Debian 12, as root): builds examples/hello for linux/amd64,
# linux/arm64 and linux/arm/v7 through a real farm (a coordinator and an agent, talking QUIC with
# mutual TLS) and pushes one multi-platform image index to a local registry.
#
#   deploy/quickstart.sh            install what is needed, build farm, run the build
#
# It starts a registry on 127.0.0.1 (left running, so you can pull the result; the script says
# how to stop it), a coordinator and an agent (stopped at the end). Everything else it makes lives
# in one directory under /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

log() { printf '\n==> %s\n' "$*"; }
free_port() { # $1: -t (TCP) or -u (UDP); first free port from $2
  local port=$2
  while ss -Hln "$1" "sport = :$port" | grep -q .; do port=$((port + 1)); done
  echo "$port"
}

log "installing packages and QEMU handlers (deploy/install.sh)"
deploy/install.sh --test-deps

log "building farm"
cargo build --release --locked
farm=$repo/target/release/farm

work=$(mktemp -d /tmp/farm-quickstart.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

reg_port=$(free_port -t 5000)
registry=127.0.0.1:$reg_port
log "starting a registry on $registry"
cat > "$work/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $work/registry}, delete: {enabled: true}}
http: {addr: $registry}
YML
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
echo $! > "$work/registry.pid"
for _ in $(seq 100); do curl -fs "http://$registry/v2/" >/dev/null && break; sleep 0.1; done
curl -fs "http://$registry/v2/" >/dev/null || { echo "the registry did not start; see $work/registry.log" >&2; exit 1; }

log "pushing a multi-arch busybox base image (from Debian's busybox-static) to $registry"
tests/fixtures/busybox-image.sh push "$registry" >/dev/null

coord_port=$(free_port -u 3276)
coordinator=127.0.0.1:$coord_port
log "creating a farm CA and starting a coordinator on $coordinator and an agent"
"$farm" ca init --dir "$work/ca" >/dev/null
agent_name=$(hostname | tr '[:upper:]' '[:lower:]' | tr -cd 'a-z0-9.-')
"$farm" ca issue --dir "$work/ca" --role agent --name "${agent_name:-agent}" >/dev/null
"$farm" coordinator --listen "$coordinator" --ca-dir "$work/ca" --state-dir "$work/coordinator" \
  > "$work/coordinator.log" 2>&1 &
pids+=($!)
# One machine builds all three platforms: three slots, so they run side by side.
"$farm" agent --coordinator "$coordinator" --ca-dir "$work/ca" --name "${agent_name:-agent}" --capacity 3 \
  --work-dir "$work/agent" > "$work/agent.log" 2>&1 &
pids+=($!)
client=(--coordinator "$coordinator" --ca-dir "$work/ca" --name admin)
for _ in $(seq 100); do "$farm" agents "${client[@]}" 2>/dev/null | grep -q " online " && break; sleep 0.2; done
"$farm" agents "${client[@]}"

log "farm build --platform linux/amd64,linux/arm64,linux/arm/v7 -t $registry/hello:1 examples/hello"
"$farm" build "${client[@]}" --platform linux/amd64,linux/arm64,linux/arm/v7 \
  -t "$registry/hello:1" --insecure-registry "$registry" \
  --build-arg "BASE=$registry/busybox:latest" examples/hello

log "the image index in the registry"
skopeo inspect --raw --tls-verify=false "docker://$registry/hello:1" |
  jq -r '.manifests[] | "\(.platform.os)/\(.platform.architecture)\(if .platform.variant then "/"+.platform.variant else "" end)  \(.digest)"'

cat <<MSG

Done. The registry keeps running on $registry so you can pull the image:
    skopeo inspect --tls-verify=false docker://$registry/hello:1
    podman run --tls-verify=false $registry/hello:1      # if you have podman
    buildah pull --tls-verify=false --platform linux/arm64 $registry/hello:1
Stop it with:  kill \$(cat $work/registry.pid)
Logs of the coordinator and the agent: $work/
MSG
