#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the report page's browser test (tests/test_report.py).
# Part of the README's test command: installs them when missing and apt can; otherwise the
# browser test is skipped (and fails under CI=true, where .ci/run expects them).
command -v chromium >/dev/null && command -v chromedriver >/dev/null && exit 0
command -v apt-get >/dev/null || { echo "no apt-get: the browser test will be skipped" >&2; exit 0; }
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium chromium-driver >/dev/null \
  || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } \
  || echo "could not install chromium: the browser test will be skipped" >&2
exit 0
