# Shared setup for scripts/*: a Python >= 3.11 virtualenv at .venv with teemesh installed.
# Sourced, not run. Installs Debian packages with apt-get when it can (root) and must.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

step() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
  # apt_install PKG...: install missing Debian packages (needs root and apt-get).
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "needs Debian packages: ${missing[*]} (no apt-get here)"
  [ "$(id -u)" -eq 0 ] || die "needs Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}"
  step "installing Debian packages: ${missing[*]}"
  if [ $apt_updated -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
  # ensure_venv [EXTRAS]: create .venv if needed and install teemesh[EXTRAS] into it.
  command -v "$PY" >/dev/null || apt_install python3
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "teemesh needs Python >= 3.11 ($("$PY" --version 2>&1) found)"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
    step "creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
  fi
  step "installing teemesh${1:+[$1]} into .venv"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  # the runtime dependencies at the image's locked versions (requirements/image.lock), so the
  # tests run what the image ships; pip takes no hashes in a constraints file, so they go
  local constraints
  constraints="$(mktemp)"
  sed -n 's/^\([A-Za-z0-9._-]*==[^ \\]*\).*/\1/p' "$ROOT/requirements/image.lock" >"$constraints"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" \
    -e "$ROOT${1:+[$1]}"
  rm -f "$constraints"
}
