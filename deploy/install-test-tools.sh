#!/usr/bin/env sh
# System packages some tests use (Debian/Ubuntu, as root): nginx for the reverse-proxy tests,
# prometheus (with promtool) for the monitoring test. Tests that need a missing tool are skipped.
# Usage: install-test-tools.sh [nginx] [prometheus]   (no argument: both)
set -u
tools="${*:-nginx prometheus}"
missing=""
case " $tools " in *" nginx "*)
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx-light";; esac
case " $tools " in *" prometheus "*)
    command -v prometheus >/dev/null 2>&1 || missing="$missing prometheus";; esac
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "not installed:$missing (needs root and apt-get); the tests that use them will be skipped"
    exit 0
fi
# The package's maintainer scripts may try to start the service; no service manager is needed here.
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null) \
    || echo "could not install:$missing; the tests that use them will be skipped"
