#!/usr/bin/env bash
# Chromium for the test that renders an evaluation's HTML page headless and reads its marks.
#
# Idempotent. Installs Debian's chromium when none is on PATH, as root (CI). Outside CI it never
# fails the build: without Chromium that test skips, saying why. In CI (CI=true) it exits 1
# instead, so a green CI always rendered the page.
set -uo pipefail

say() { echo "chromium.sh: $*"; }
found() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }

if found; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing chromium"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || say "apt-get failed"
  if found; then exit 0; fi
fi
if [ "${CI:-}" = true ]; then say "no chromium; CI needs it for the HTML report test."; exit 1; fi
say "no chromium; the HTML report test will be skipped."
exit 0
