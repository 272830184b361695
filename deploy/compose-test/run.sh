#!/usr/bin/env bash
# `make compose-test`: start docker-compose.yml for real with podman on a machine without a GPU
# or a registry, and drive a fine-tune and a generation through it, then stop a worker in the
# middle of a fine-tune and see the job finish on the other (drive.py).
#
# Needs root, Debian's podman (4.3) with runc, debootstrap, the dnsname CNI plugin, and
# podman-compose (installed here into a private venv). Base images are local stand-ins built
# from a debootstrap rootfs (standins.Containerfile); the project's images are built from its
# Dockerfile. Work files go to $COMPOSE_TEST_DIR (default /var/tmp/tuneqdm-compose-test).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
work="${COMPOSE_TEST_DIR:-/var/tmp/tuneqdm-compose-test}"
python="${PYTHON:-python3}"
mkdir -p "$work"
# runc: crun fails on cgroup v1 hosts; ulimits: the defaults podman asks for exceed some hosts'.
podman_run_opts=(--runtime /usr/sbin/runc)
export CONTAINERS_CONF="$work/containers.conf"
cat >"$CONTAINERS_CONF" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF

step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }

step "podman-compose"
if [ ! -x "$work/venv/bin/podman-compose" ]; then
  "$python" -m venv "$work/venv"
  "$work/venv/bin/pip" install -q "podman-compose==1.6.0" pyyaml httpx pillow
fi

step "stand-in base images"
if ! podman image exists localhost/tuneqdm-standin-rootfs; then
  if [ ! -f "$work/rootfs.tar" ]; then
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase \
      --include=python3,python3-pip,python3-venv,python-is-python3,postgresql,redis-server,redis-tools,wget,ca-certificates,passwd \
      bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log"
    tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
    rm -rf "$work/rootfs"
  fi
  podman import "$work/rootfs.tar" localhost/tuneqdm-standin-rootfs
fi
# Their build context: the Containerfile, the postgres entrypoint and SeaweedFS's `weed` (the
# static binary the tests use, beside the interpreter or on PATH).
context="$work/standins"
rm -rf "$context" && mkdir -p "$context"
cp "$here/standins.Containerfile" "$here/postgres-entrypoint.sh" "$context/"
weed="$(dirname "$python")/weed"
[ -x "$weed" ] || weed="$(command -v weed)"
cp "$weed" "$context/weed"
for target in python:docker.io/library/python:3.11-slim postgres:docker.io/library/postgres:17 \
  redis:docker.io/library/redis:7 seaweedfs:docker.io/chrislusf/seaweedfs:4.48; do
  podman build -q --target "${target%%:*}" -t "${target#*:}" -f "$context/standins.Containerfile" "$context" >/dev/null
done

step "the project's images (Dockerfile)"
# pip inside the build uses this machine's pip configuration (its index, local wheel folders,
# constraints) and CA bundle (which may hold a TLS-inspecting proxy's CA): an /etc/pip.conf and
# the bundle, mounted read-only into the build's RUN steps, with the folders they name.
pip_opts=()
pip_env="$("$python" -m pip config list 2>/dev/null || true)"
: >"$work/pip.conf"
if [ -n "$pip_env" ]; then
  printf '[global]\n' >"$work/pip.conf"
  printf '%s\n' "$pip_env" | sed -n "s/^[^.]*\.\([a-z-]*\)='\(.*\)'$/\1 = \2/p" | sort -u >>"$work/pip.conf"
  pip_opts+=(--volume "$work/pip.conf:/etc/pip.conf:ro")
fi
for path in /opt/wheels /opt/pypi /opt/pypi-more /etc/xdg/pip; do
  [ -e "$path" ] && pip_opts+=(--volume "$path:$path:ro")
done
pip_opts+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
podman build -q "${pip_opts[@]}" --target api -t localhost/tuneqdm-api:compose-test "$root" >/dev/null
# The CPU build of the Dockerfile's torch pin (its plain PyPI wheel is the multi-GB CUDA one).
podman build -q "${pip_opts[@]}" --build-arg "TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}" \
  --target worker -t localhost/tuneqdm-worker:compose-test "$root" >/dev/null

step "compose file for the CPU"
"$work/venv/bin/python" "$here/cpu_compose.py" "$root" "$work/compose.yml" \
  localhost/tuneqdm-api:compose-test localhost/tuneqdm-worker:compose-test
# The built-in model, named as such (the compose file's defaults name SD 1.5).
export TUNEQDM_BASE_MODEL=tuneqdm/fashion-sd
export TUNEQDM_SECRET_KEY="${TUNEQDM_SECRET_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
compose=("$work/venv/bin/podman-compose" --podman-run-args="${podman_run_opts[*]}" -f "$work/compose.yml")

step "up"
"${compose[@]}" down -v >/dev/null 2>&1 || true
status=0
"$work/venv/bin/python" "$here/drive.py" "$work" -- "${compose[@]}" || status=$?
step "down"
"${compose[@]}" down -v >/dev/null 2>&1 || true
exit "$status"
