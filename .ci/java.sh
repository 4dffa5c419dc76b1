#!/usr/bin/env bash
# Java 17+ for the tests that run Spark (pyspark in local mode starts a JVM).
#
# Idempotent. Installs Debian's/Ubuntu's openjdk-17-jre-headless when no Java 17+ is on PATH, as
# root (CI). Outside CI it never fails the build: without Java the Spark tests skip, saying why.
# In CI (CI=true) it exits 1 instead, so a green CI always ran the Spark tests.
set -uo pipefail

say() { echo "java.sh: $*"; }
java_major() { java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1; }

major=$(command -v java >/dev/null && java_major)
if [ -n "$major" ] && [ "$major" -ge 17 ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  say "installing openjdk-17-jre-headless (found: ${major:-no java})"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null) \
    || say "apt-get failed"
  major=$(command -v java >/dev/null && java_major)
  if [ -n "$major" ] && [ "$major" -ge 17 ]; then exit 0; fi
fi
if [ "${CI:-}" = true ]; then say "no Java 17+ (found: ${major:-none}); CI needs it for the Spark tests."; exit 1; fi
say "no Java 17+ (found: ${major:-none}); the Spark tests will be skipped."
exit 0
