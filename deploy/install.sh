#!/usr/bin/env bash
# Prepare a Debian/Ubuntu host (as root) to run a farm coordinator or agent.
#
#   deploy/install.sh [--no-binfmt] [--emulation] [--test-deps]   packages + QEMU handlers + Rust check
#   deploy/install.sh binfmt                         only (re)register the QEMU handlers
#
# --no-binfmt  do not register QEMU binfmt_misc handlers (native agents that must not emulate)
# --emulation  on a non-x86_64 host, also install qemu-user-static and register handlers
#              (x86_64 hosts emulate by default)
# --test-deps  also fetch what farm's tests and quick start need: Debian's busybox-static for
#              amd64, arm64 and armhf (the multi-arch base image, since no outside registry is used),
#              docker.io (a Docker Engine the tests start themselves), tmux, and cosign 2.x from
#              Debian 13 (trixie; only that package, nothing else is upgraded), and
#              kubernetes-validate from PyPI in a venv under /opt (python3-venv from apt), and
#              Debian's chromium and chromium-driver (the dashboard test drives headless Chromium)
# Safe to run again: installed packages and correct handlers are left alone.
set -euo pipefail

QEMU_ARCHES=(aarch64 arm riscv64 ppc64le s390x)
BINFMT=/proc/sys/fs/binfmt_misc
MIN_CARGO=1.90

log() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

mode=all do_binfmt=1 emulation=0 test_deps=0
[[ $(uname -m) == x86_64 ]] && emulation=1
for arg in "$@"; do
  case $arg in
    binfmt) mode=binfmt ;;
    --no-binfmt) do_binfmt=0 ;;
    --emulation) emulation=1 ;;
    --test-deps) test_deps=1 ;;
    -h|--help) sed -n '2,10s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done
[[ $EUID -eq 0 ]] || die "must run as root"

install_packages() {
  local pkgs=(buildah runc slirp4netns docker-registry skopeo jq curl ca-certificates iproute2) missing=()
  ((emulation)) && pkgs+=(qemu-user-static)
  # The tests also start their own Docker Engine (the Docker builder's tests) and drive the live
  # view in a terminal multiplexer.
  ((test_deps)) && pkgs+=(docker.io tmux)
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "packages already installed: ${pkgs[*]}"
    return
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q "${missing[@]}"
}

# The metrics test scrapes the coordinator with a real Prometheus it starts itself. Without
# recommends (no node exporter listening on every interface), and its system service off.
install_prometheus() {
  if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q 'ok installed'; then
    log "apt-get install --no-install-recommends prometheus"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends prometheus || { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; }
  fi
  if command -v systemctl >/dev/null && systemctl is-enabled prometheus >/dev/null 2>&1; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
}

# Debian's Chromium and its chromedriver: tests/dashboard.rs drives the web dashboard in headless Chromium.
install_chromium() {
  if ! dpkg-query -W -f='${Status}' chromium-driver 2>/dev/null | grep -q 'ok installed'; then
    log "apt-get install --no-install-recommends chromium chromium-driver"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends chromium chromium-driver || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium chromium-driver; }
  fi
}

# kubernetes-validate (PyPI) checks deploy/kubernetes against the Kubernetes schemas (tests/kubernetes.rs).
# Debian has no package for it: it goes into its own venv under /opt (nothing else from pip touches
# the system's Python), linked into /usr/local/bin. Already there: left alone.
KUBERNETES_VALIDATE_VERSION=1.37.0
install_kubernetes_validate() {
  local venv=/opt/kubernetes-validate
  if [[ ! -x $venv/bin/kubernetes-validate ]]; then
    if ! /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null; then
      log "apt-get install --no-install-recommends python3-venv"
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -q --no-install-recommends python3-venv || { apt-get update -q && apt-get install -y -q --no-install-recommends python3-venv; }
    fi
    log "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install -q "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  fi
  ln -sf "$venv/bin/kubernetes-validate" /usr/local/bin/kubernetes-validate
}

# Debian 13 (trixie) packages that install on Debian 12 as they are (they depend only on libc6 >=
# 2.34): cosign and oras, which the signing tests verify farm's signatures and referrers with.
# Only these packages come
# from trixie: its package list is read into a private apt directory (the system's sources and
# lists are untouched), `apt-get download` fetches the .deb and dpkg installs it, so nothing else
# on the machine is upgraded. Already installed at a 2.x version: left alone.
TRIXIE_TOOLS=(cosign oras)
install_trixie_tools() {
  local missing=() p
  for p in "${TRIXIE_TOOLS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    log "from Debian 13 (trixie), already installed: ${TRIXIE_TOOLS[*]}"
    return
  fi
  local apt_dir
  apt_dir=$(mktemp -d)
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc/preferences.d"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    >"$apt_dir/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::Etc::PreferencesParts=$apt_dir/etc/preferences.d"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
  log "fetching ${missing[*]} from Debian 13 (trixie) into $apt_dir (only these packages)"
  apt-get "${opts[@]}" update -q
  (cd "$apt_dir" && apt-get "${opts[@]}" download -q "${missing[@]}")
  dpkg -i "$apt_dir"/*.deb
  rm -rf "$apt_dir"
}

# Debian's docker-registry package starts a registry on :5000 on every interface. farm starts
# its own registries (tests, quick start) on loopback, so the system one is switched off.
disable_system_registry() {
  if command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then
    log "disabling the docker-registry system service (it listens on all interfaces)"
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
}

# Which of QEMU_ARCHES this host can run natively (no handler registered for those).
native_family() {
  case $(uname -m) in
    aarch64|arm64) echo "aarch64 arm" ;;  # most arm64 CPUs also run arm32 binaries
    arm*) echo "arm" ;;
    *) uname -m ;;                          # x86_64 matches none; riscv64, ppc64le, s390x match themselves
  esac
}

# Register qemu-<arch> with the F (open the interpreter now, so it works inside chroots and
# mount namespaces of builds) and P (keep argv[0]) flags, pointing at the static binary.
register_handler() {
  local arch=$1 entry=$BINFMT/qemu-$1 interp=/usr/bin/qemu-$1-static conf=/usr/lib/binfmt.d/qemu-$1.conf
  [[ -x $interp ]] || die "$interp missing (apt-get install qemu-user-static)"
  [[ -r $conf ]] || die "$conf missing (apt-get install qemu-user-static)"
  if [[ -e $entry ]] && [[ $(head -n1 "$entry") == enabled ]] &&
     grep -qx "interpreter $interp" "$entry" &&
     grep -q '^flags: .*F' "$entry" && grep -q '^flags: .*P' "$entry"; then
    log "qemu-$arch: already registered"
    return
  fi
  [[ -e $entry ]] && echo -1 > "$entry"   # remove Debian's (or a stale) handler of that name
  # Debian's line is :name:type:offset:magic:mask:interpreter:flags; the \xNN escapes in magic
  # and mask are decoded by the kernel, so they are passed on verbatim.
  local _ type offset magic mask
  IFS=: read -r _ _ type offset magic mask _ < <(grep -m1 '^:' "$conf")
  local rule=":qemu-$arch:$type:$offset:$magic:$mask:$interp:FP"
  printf '%s' "$rule" > "$BINFMT/register"
  # Same file name as Debian's, so systemd-binfmt uses ours instead after a reboot.
  if [[ -d /etc/binfmt.d ]]; then printf '%s\n' "$rule" > "/etc/binfmt.d/qemu-$arch.conf"; fi
  log "qemu-$arch: registered $interp (flags FP)"
}

setup_binfmt() {
  if [[ ! -e $BINFMT/register ]]; then
    log "mounting binfmt_misc on $BINFMT"
    mount -t binfmt_misc binfmt_misc "$BINFMT"
  fi
  local skip; skip=" $(native_family) "
  for arch in "${QEMU_ARCHES[@]}"; do
    [[ $skip == *" $arch "* ]] && { log "qemu-$arch: host runs it natively, skipped"; continue; }
    register_handler "$arch"
  done
  log "enabled handlers:"
  for entry in "$BINFMT"/qemu-*; do
    [[ -e $entry ]] || continue
    printf '    %-14s %-9s %-34s %s\n' "${entry##*/}" "$(head -n1 "$entry")" \
      "$(sed -n 's/^interpreter //p' "$entry")" "$(grep '^flags:' "$entry")"
  done
}

check_cargo() {
  local cargo; cargo=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
  local ver=""
  # Run from / so that a rust-toolchain file in the current directory cannot make rustup download.
  if [[ -x $cargo ]]; then ver=$(cd / && "$cargo" --version 2>/dev/null | awk '{print $2}') || true; fi
  if [[ -z $ver || $(printf '%s\n' "$MIN_CARGO" "$ver" | sort -V | head -n1) != "$MIN_CARGO" ]]; then
    cat >&2 <<EOF
install.sh: cargo ${ver:-not found}; farm needs Rust >= $MIN_CARGO. Install it with rustup, then re-run:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
    . "\$HOME/.cargo/env"
EOF
    exit 1
  fi
  log "cargo $ver (>= $MIN_CARGO)"
}

if [[ $mode == binfmt ]]; then
  setup_binfmt
  exit 0
fi
install_packages
disable_system_registry
if ((do_binfmt && emulation)); then
  setup_binfmt
else
  log "QEMU binfmt handlers: skipped (--no-binfmt, or a non-x86_64 host without --emulation)"
fi
if ((test_deps)); then
  install_prometheus
  install_chromium
  install_kubernetes_validate
  "$(dirname "$0")/../tests/fixtures/busybox-image.sh" prepare
  install_trixie_tools
fi
check_cargo
