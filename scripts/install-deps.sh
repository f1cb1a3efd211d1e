#!/usr/bin/env bash
# Installs what the test suite needs on a Debian (bookworm) machine.
# Idempotent and non-interactive: does nothing when everything is already present.
#   - Debian packages: kamailio (PBX stand-in for the interop tests), iproute2, procps
#   - Rust toolchain: cargo must exist; the rustfmt and clippy components are added
# Runs as root, or through `sudo -n` when not root.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(kamailio iproute2 procps)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        SUDO=(__no_root__)
    fi
fi
as_root() {
    if [ "${SUDO[0]:-}" = "__no_root__" ]; then
        echo "install-deps: need root (or sudo) to run: $*" >&2
        return 1
    fi
    "${SUDO[@]}" "$@"
}

installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done

kamailio_was_missing=0
if [ "${#missing[@]}" -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-deps: apt-get not found; please install: ${missing[*]}" >&2
        exit 1
    fi
    for pkg in "${missing[@]}"; do
        [ "$pkg" = kamailio ] && kamailio_was_missing=1
    done
    echo "install-deps: installing ${missing[*]}"

    # A policy-rc.d that forbids starting services keeps the package's maintainer scripts
    # (invoke-rc.d / deb-systemd-invoke) from launching a system Kamailio on 5060.
    # Only created (and removed afterwards) if there is none already.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
        created_policy=1
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
    fi

    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" </dev/null

    if [ "$created_policy" -eq 1 ]; then
        as_root rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
fi

# Leave no packaged Kamailio service running after installing it: the tests start their
# own instances (own config, random ports) and a system one on 5060 only gets in the way.
if [ "$kamailio_was_missing" -eq 1 ]; then
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        as_root systemctl stop kamailio >/dev/null 2>&1 || true
        as_root systemctl disable kamailio >/dev/null 2>&1 || true
    fi
    if [ -f /run/kamailio/kamailio.pid ] && [ -x /etc/init.d/kamailio ]; then
        as_root /etc/init.d/kamailio stop </dev/null >/dev/null 2>&1 || true
    fi
fi
if command -v ss >/dev/null 2>&1 && ss -H -lnup 2>/dev/null | grep -q ':5060 .*kamailio'; then
    echo "install-deps: note: a kamailio is listening on 5060 (not used by the tests)" >&2
fi

# Rust toolchain.
if [ -d "$HOME/.cargo/bin" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    components="$(rustup component list --installed 2>/dev/null || true)"
    for comp in rustfmt clippy; do
        if ! grep -q "^${comp}" <<<"$components"; then
            echo "install-deps: adding rustup component $comp"
            rustup component add "$comp" </dev/null ||
                echo "install-deps: warning: could not add $comp (offline?)" >&2
        fi
    done
else
    for tool in rustfmt cargo-clippy; do
        command -v "$tool" >/dev/null 2>&1 ||
            echo "install-deps: warning: $tool not found and no rustup to add it" >&2
    done
fi

echo "install-deps: ok"
