#!/usr/bin/env bash
# Install Debian's `prometheus` package (which also ships `promtool`) when the
# `prometheus` binary is missing.  Idempotent: does nothing when it is present.
#
# The Debian package starts a prometheus service listening on :9090.  The
# tests run their own Prometheus on a free port with their own config, so the
# packaged service is stopped and disabled again here, and it is never left
# bound to port 9090.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

stop_packaged_service() {
    # With systemd: stop and disable the unit.  Without it (containers): the
    # postinst may still have launched the daemon through its init script.
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl stop prometheus.service 2>/dev/null || true
        systemctl disable prometheus.service 2>/dev/null || true
    fi
    if [ -x /etc/init.d/prometheus ]; then
        /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    fi
    # Whatever is left: only the packaged daemon, identified by its config path
    # (/etc/prometheus/prometheus.yml) and the 'prometheus' user.
    local pids
    pids=$(pgrep -u prometheus -x prometheus 2>/dev/null || true)
    if [ -n "$pids" ]; then
        echo "install-prometheus: stopping packaged prometheus daemon(s): $pids"
        # shellcheck disable=SC2086
        kill $pids 2>/dev/null || true
        for _ in $(seq 1 50); do
            pgrep -u prometheus -x prometheus >/dev/null 2>&1 || break
            sleep 0.1
        done
    fi
}

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    echo "install-prometheus: $(command -v prometheus) already installed"
    stop_packaged_service
    exit 0
fi

# Keep the packaged service from starting at all where policy-rc.d is honoured
# (invoke-rc.d exit 101 = "action forbidden").  Removed again afterwards.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod +x "$policy"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi
}
trap cleanup EXIT

apt-get update -q
apt-get install -y -q --no-install-recommends prometheus

stop_packaged_service

prometheus --version 2>&1 | head -n 1
promtool --version 2>&1 | head -n 1
