#!/usr/bin/env bash
# Install roomscore as a system service on a headless Debian-like box.
#
#   sudo deploy/install.sh [--dry-run] [--with-onnxruntime] [--no-build] [--no-apt] [--no-start]
#
# Run from the repository root, as root. Safe to run again (after a `git pull`, say): it
# rebuilds, reinstalls the binary, scenes, models and unit, restarts the service, and keeps
# /etc/roomscore/roomscore.env as it is.
#
#   --dry-run           print what would be done, change nothing (root not needed)
#   --with-onnxruntime  also make a Python venv in /opt/roomscore/venv with onnxruntime==1.31.1
#                       and point ORT_DYLIB_PATH at its libonnxruntime.so (for the trained model)
#   --no-build          use the existing target/release/roomscore instead of building
#   --no-apt            don't install Debian packages (you did already)
#   --no-start          install and enable, but don't start or restart the service
set -euo pipefail

readonly ORT_VERSION=1.31.1
readonly PREFIX=/opt/roomscore
readonly BIN=/usr/local/bin/roomscore
readonly ETC=/etc/roomscore
readonly ENV_FILE=$ETC/roomscore.env
readonly STATE=/var/lib/roomscore
readonly UNIT=/etc/systemd/system/roomscore.service
readonly SVC_USER=roomscore
readonly SVC_GROUP=audio

# Build and run-time packages. libasound2/libjack-jackd2-0 come with the -dev packages.
readonly APT_PACKAGES=(
    build-essential pkg-config
    libasound2-dev libjack-jackd2-dev
    alsa-utils ca-certificates
)
readonly APT_PACKAGES_ORT=(python3 python3-venv)

DRY_RUN=0
WITH_ORT=0
BUILD=1
APT=1
START=1

usage() { sed -n '2,16s/^# \{0,1\}//p' "$0"; }

for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --with-onnxruntime) WITH_ORT=1 ;;
        --no-build) BUILD=0 ;;
        --no-apt) APT=0 ;;
        --no-start) START=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown option: $arg" >&2; usage >&2; exit 2 ;;
    esac
done

say() { printf '==> %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

# Run a command, or print it under --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '[dry-run] %s\n' "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}

# Copy one file to DEST with MODE, only if it differs; a changed file that was edited in
# place is kept as DEST.bak.<time> first (so an operator's scene edits are never lost).
put() {
    local src=$1 dest=$2 mode=$3 backup=${4:-no}
    if [[ -e $dest ]] && cmp -s "$src" "$dest"; then
        return 0
    fi
    if [[ -e $dest && $backup == backup ]]; then
        local bak
        bak="$dest.bak.$(date +%Y%m%d-%H%M%S)"
        say "$dest differs from the repository's; keeping the old one as $bak"
        run cp -p "$dest" "$bak"
    fi
    run install -D -m "$mode" "$src" "$dest"
}

# ---------------------------------------------------------------- preflight

[[ -f Cargo.toml && -f deploy/roomscore.service && -d scenes ]] \
    || die "run me from the roomscore repository root (where Cargo.toml is): sudo deploy/install.sh"

if ((EUID != 0)); then
    if ((DRY_RUN)); then
        warn "not root; fine for --dry-run, a real install needs: sudo deploy/install.sh"
    else
        die "run me as root: sudo deploy/install.sh"
    fi
fi

HAVE_SYSTEMD=0
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
    HAVE_SYSTEMD=1
fi

# ---------------------------------------------------------------- packages

if ((APT)); then
    pkgs=("${APT_PACKAGES[@]}")
    ((WITH_ORT)) && pkgs+=("${APT_PACKAGES_ORT[@]}")
    missing=()
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing Debian packages: ${missing[*]}"
        run apt-get update
        run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    else
        say "Debian packages already installed"
    fi
fi

# ---------------------------------------------------------------- build

# The repository may belong to the user who cloned it; build as that user so target/
# stays theirs, with their rustup toolchain if they have one.
REPO_OWNER=$(stat -c %U .)
REPO_HOME=$(getent passwd "$REPO_OWNER" | cut -d: -f6)
CARGO_PATH="$REPO_HOME/.cargo/bin:$PATH"
as_owner() {
    if [[ $REPO_OWNER == root || $REPO_OWNER == "$(id -un)" ]]; then
        env PATH="$CARGO_PATH" "$@"
    else
        runuser -u "$REPO_OWNER" -- env PATH="$CARGO_PATH" HOME="$REPO_HOME" "$@"
    fi
}

need_rust=$(sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n1)
need_rust=${need_rust:-1.92}

if ((BUILD)); then
    if ! as_owner cargo --version >/dev/null 2>&1; then
        msg="cargo (Rust >= $need_rust) was not found for user $REPO_OWNER.
    Get it, then run me again:
      - as $REPO_OWNER, follow https://rustup.rs (the stable toolchain; it installs to
        ~$REPO_OWNER/.cargo/bin, which this script looks in). Debian's own cargo is too old
        (Debian 12 has 1.63, Debian 13 1.85).
    Or build elsewhere, copy the binary to target/release/roomscore and use --no-build."
        if ((DRY_RUN)); then warn "$msg"; else die "$msg"; fi
    else
        have_rust=$(as_owner rustc --version 2>/dev/null | awk '{print $2}')
        if [[ -n $have_rust ]] && [[ $(printf '%s\n%s\n' "$need_rust" "$have_rust" | sort -V | head -n1) != "$need_rust" ]]; then
            msg="rustc $have_rust is older than the $need_rust this project needs (Debian's cargo is: use rustup's stable toolchain, https://rustup.rs, as $REPO_OWNER)"
            if ((DRY_RUN)); then warn "$msg"; else die "$msg"; fi
        fi
        say "building (cargo build --release --locked) as $REPO_OWNER; the first build takes a while"
        run as_owner cargo build --release --locked
    fi
fi
if [[ ! -x target/release/roomscore ]]; then
    if ((DRY_RUN)); then
        warn "target/release/roomscore does not exist yet (it would after the build)"
    else
        die "target/release/roomscore is missing; build it (drop --no-build)"
    fi
fi

# ---------------------------------------------------------------- user

if id -u "$SVC_USER" >/dev/null 2>&1; then
    say "user $SVC_USER exists"
    if ! id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx "$SVC_GROUP"; then
        run usermod -a -G "$SVC_GROUP" "$SVC_USER"
    fi
else
    say "creating system user $SVC_USER (group $SVC_GROUP)"
    getent group "$SVC_GROUP" >/dev/null || run groupadd --system "$SVC_GROUP"
    run useradd --system --gid "$SVC_GROUP" --groups "$SVC_GROUP" \
        --home-dir "$STATE" --no-create-home --shell /usr/sbin/nologin \
        --comment "roomscore music engine" "$SVC_USER"
fi

# ---------------------------------------------------------------- files

say "installing the binary to $BIN"
if [[ -x target/release/roomscore ]]; then
    put target/release/roomscore "$BIN" 0755
else
    run install -D -m 0755 target/release/roomscore "$BIN"
fi

say "installing scenes to $PREFIX/scenes"
run install -d -m 0755 "$PREFIX" "$PREFIX/scenes" "$PREFIX/models" "$PREFIX/deploy"
while IFS= read -r -d '' f; do
    put "$f" "$PREFIX/$f" 0644 backup
done < <(find scenes -type f ! -name '*.bak.*' -print0 | sort -z)

say "installing models to $PREFIX/models"
shopt -s nullglob
models=(models/*.onnx models/*.json)
shopt -u nullglob
if ((${#models[@]})); then
    for f in "${models[@]}"; do put "$f" "$PREFIX/$f" 0644; done
else
    say "no models/*.onnx in the repository: scenes with source = \"model\" will fall back to the rule-based composer"
fi

say "installing the operator's guide and examples to $PREFIX"
put deploy/README.md "$PREFIX/README.md" 0644
for f in deploy/asoundrc.usb-example deploy/asoundrc.file-capture deploy/roomscore.env.example \
    deploy/jack/roomscore-jack.service deploy/clients/*; do
    [[ -f $f ]] || continue
    mode=0644
    [[ $f == *.py || $f == *.sh ]] && mode=0755
    put "$f" "$PREFIX/$f" "$mode"
done

say "state directory $STATE (recordings, input logs)"
run install -d -m 0750 -o "$SVC_USER" -g "$SVC_GROUP" "$STATE"

# ---------------------------------------------------------------- onnxruntime (optional)

ORT_LIB=""
if ((WITH_ORT)); then
    say "Python venv with onnxruntime==$ORT_VERSION in $PREFIX/venv"
    [[ -x $PREFIX/venv/bin/python ]] || run python3 -m venv "$PREFIX/venv"
    run "$PREFIX/venv/bin/pip" install --disable-pip-version-check --quiet "onnxruntime==$ORT_VERSION"
    if ((DRY_RUN)); then
        ORT_LIB="$PREFIX/venv/lib/python3.X/site-packages/onnxruntime/capi/libonnxruntime.so.$ORT_VERSION"
    else
        ORT_LIB=$(find "$PREFIX/venv/lib" -path '*/onnxruntime/capi/libonnxruntime.so*' -type f | sort | tail -n1)
        [[ -n $ORT_LIB ]] || die "onnxruntime installed but libonnxruntime.so not found under $PREFIX/venv"
    fi
    say "ONNX Runtime library: $ORT_LIB"
fi

# ---------------------------------------------------------------- config

if [[ -e $ENV_FILE ]]; then
    say "keeping the existing $ENV_FILE"
    if [[ -n $ORT_LIB ]] && ! grep -q '^ORT_DYLIB_PATH=' "$ENV_FILE"; then
        say "adding ORT_DYLIB_PATH to $ENV_FILE"
        if ((DRY_RUN)); then
            printf '[dry-run] echo ORT_DYLIB_PATH=%s >> %s\n' "$ORT_LIB" "$ENV_FILE"
        else
            printf 'ORT_DYLIB_PATH=%s\n' "$ORT_LIB" >>"$ENV_FILE"
        fi
    fi
    for var in ROOMSCORE_SCENE ROOMSCORE_OUTPUT ROOMSCORE_HOST ROOMSCORE_BUFFER ROOMSCORE_OSC; do
        grep -q "^$var=." "$ENV_FILE" || warn "$ENV_FILE has no $var=...; see $PREFIX/deploy/roomscore.env.example"
    done
else
    say "writing $ENV_FILE"
    run install -d -m 0755 "$ETC"
    if ((DRY_RUN)); then
        printf '[dry-run] install -m 0644 deploy/roomscore.env.example %s%s\n' "$ENV_FILE" \
            "${ORT_LIB:+ (with ORT_DYLIB_PATH=$ORT_LIB)}"
    else
        tmp=$(mktemp)
        cp deploy/roomscore.env.example "$tmp"
        if [[ -n $ORT_LIB ]]; then
            printf 'ORT_DYLIB_PATH=%s\n' "$ORT_LIB" >>"$tmp"
        fi
        install -m 0644 "$tmp" "$ENV_FILE"
        rm -f "$tmp"
    fi
fi

# ---------------------------------------------------------------- check the scene

# Best effort: `roomscore check` the configured scene, so a typo shows now, not in the journal.
if [[ -x $BIN && -r $ENV_FILE ]]; then
    scene=$(sed -n 's/^ROOMSCORE_SCENE=//p' "$ENV_FILE" | tail -n1)
    if [[ -n $scene && -r $scene ]]; then
        if ((DRY_RUN)); then
            printf '[dry-run] %s check %q\n' "$BIN" "$scene"
        elif ! (cd "$PREFIX" && "$BIN" check "$scene"); then
            warn "roomscore check $scene failed: the service will not start until the scene is fixed"
        fi
    fi
fi

# ---------------------------------------------------------------- systemd

say "installing the unit $UNIT"
put deploy/roomscore.service "$UNIT" 0644

if ((HAVE_SYSTEMD || DRY_RUN)); then
    ((HAVE_SYSTEMD)) || warn "systemd is not PID 1 here; showing the systemctl steps a real box would run"
    was_active=0
    if ((HAVE_SYSTEMD)) && systemctl is-active --quiet roomscore; then was_active=1; fi
    run systemctl daemon-reload
    if ((START)); then
        run systemctl enable --now roomscore
        # enable --now doesn't restart a running service: pick up the new binary/unit.
        if ((was_active)); then run systemctl restart roomscore; fi
        say "done. Check it with:  systemctl status roomscore   and   journalctl -u roomscore -f"
    else
        run systemctl enable roomscore
        say "done (not started). Start it with:  systemctl start roomscore"
    fi
else
    warn "systemd is not running as PID 1 here (a container?): unit installed but not enabled/started.
    On the real box: systemctl daemon-reload && systemctl enable --now roomscore"
fi
