#!/usr/bin/env bash
# Builds the Debian 13 (trixie) root that the tests run RabbitMQ 4.x from (tests/rabbitmq4.py).
#
#   bash tests/rabbitmq4-root.sh           build it, unless it is there already (then: nothing)
#   bash tests/rabbitmq4-root.sh --where   print where it lives (built or not)
#
# Where: $RABBITMQ4_ROOT, else ${XDG_CACHE_HOME:-$HOME/.cache}/netcore-activity/rabbitmq4-trixie,
# outside the checkout: about 300 MB that every clone and worktree of the machine shares.
#
# What: debootstrap's minbase variant plus rabbitmq-server and what it depends on (Erlang), and
# an /etc/hosts that names localhost. Nothing is started in it and nothing stays mounted:
# debootstrap runs in a mount namespace of its own, so the /proc and /sys it mounts in the root go
# with it, even when it is killed. It is built in a directory beside the root and renamed into
# place when complete, so an interrupted build leaves no half root behind (the next build starts
# over). Needs root (debootstrap, chroot) and debootstrap (Debian's package). Takes from half a
# minute to four, nearly all of it downloading; the mirror is the machine's own (the first Debian
# URI of its APT sources) unless $RABBITMQ4_MIRROR names one.
set -euo pipefail

SUITE=trixie
HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
ROOT="${RABBITMQ4_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/netcore-activity/rabbitmq4-$SUITE}"
# The marker a complete root carries: the rabbitmq-server version in it.
MARKER=.rabbitmq-server-version

if [[ "${1:-}" == "--where" ]]; then
  echo "$ROOT"
  exit 0
fi

if [[ -f "$ROOT/$MARKER" ]]; then
  echo "RabbitMQ $(cat "$ROOT/$MARKER") root is there already: $ROOT"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  echo "building the RabbitMQ 4.x root needs root (debootstrap, chroot)" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  echo "debootstrap is not installed (apt-get install debootstrap)" >&2
  exit 1
fi

# The machine's Debian mirror: the first URI of its APT sources that ends in /debian.
mirror() {
  if [[ -n "${RABBITMQ4_MIRROR:-}" ]]; then
    echo "$RABBITMQ4_MIRROR"
    return
  fi
  cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | sed -n -E 's,^(URIs:[[:space:]]*|deb[[:space:]]+(\[[^]]*\][[:space:]]+)?)([^[:space:]]+/debian/?)([[:space:]].*)?$,\3,p' \
    | head -n 1
}

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock 9  # one build at a time; who waited finds it built
if [[ -f "$ROOT/$MARKER" ]]; then
  echo "RabbitMQ $(cat "$ROOT/$MARKER") root is there already: $ROOT"
  exit 0
fi

if [[ -e "$ROOT" ]]; then
  echo "$ROOT is there but is not a root this script built (no $MARKER): remove it or set RABBITMQ4_ROOT" >&2
  exit 1
fi
PARTIAL="$ROOT.partial"
# Left by an interrupted build. Its mounts died with its namespace; --one-file-system guards the
# machine's files all the same.
rm -rf --one-file-system "$PARTIAL"

started=$SECONDS
echo "Building the RabbitMQ 4.x root (Debian $SUITE, minbase + rabbitmq-server) in $ROOT"
# shellcheck disable=SC2046  # the mirror is one word, or none (debootstrap's default)
unshare --mount --propagation private \
  debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$PARTIAL" $(mirror)

printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$PARTIAL/etc/hosts"
rm -f "$PARTIAL"/var/cache/apt/archives/*.deb
version=$(chroot "$PARTIAL" dpkg-query -W -f '${Version}' rabbitmq-server)
case "$version" in
  4.*) ;;
  *) echo "Debian $SUITE's rabbitmq-server is $version, not 4.x" >&2; exit 1 ;;
esac
echo "$version" >"$PARTIAL/$MARKER"
mv "$PARTIAL" "$ROOT"
echo "RabbitMQ $version root built in $((SECONDS - started)) s: $ROOT ($(du -sh "$ROOT" | cut -f1))"
