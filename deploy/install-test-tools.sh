#!/usr/bin/env sh
# System packages some tests use (Debian/Ubuntu, as root): nginx for the reverse-proxy tests (default suite:
# they fail without it), prometheus (with promtool) for the monitoring test (slow; skipped without it).
# Usage: install-test-tools.sh [nginx] [prometheus]   (no argument: both)
# Exits 0 only when every tool asked for is installed afterwards; otherwise non-zero, naming what is missing.
set -u
tools="${*:-nginx prometheus}"

has() {  # has TOOL: the tool's binary is on this machine
    case "$1" in
        nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || [ -x /usr/local/sbin/nginx ] ;;
        prometheus) command -v prometheus >/dev/null 2>&1 ;;
    esac
}

missing=""   # tools asked for and not installed
packages=""  # their Debian packages
for tool in $tools; do
    case "$tool" in
        nginx) package=nginx-light ;;
        prometheus) package=prometheus ;;
        *) echo "install-test-tools.sh: unknown tool '$tool' (known: nginx prometheus)" >&2; exit 2 ;;
    esac
    has "$tool" || { missing="$missing $tool"; packages="$packages $package"; }
done
[ -z "$missing" ] && exit 0

fail() {
    echo "install-test-tools.sh: $1" >&2
    echo "  missing:$missing. As root: make test-tools (or apt-get install -y$packages)" >&2
    exit 1
}
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    fail "cannot install the test tools: this needs root and apt-get"
fi
# The package's maintainer scripts may try to start the service; no service manager is needed here.
# shellcheck disable=SC2086  # $packages is a list of package names
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $packages >/dev/null; }; then
    fail "apt-get could not install$packages"
fi
for tool in $missing; do
    has "$tool" || fail "$tool is still not found after installing its package"
done
echo "installed:$packages"
