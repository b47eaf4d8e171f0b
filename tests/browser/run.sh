#!/usr/bin/env bash
# The admin page in a real browser: Debian's chromium (headless), driven by playwright-core.
# Exit 77 (meson's "skipped") when chromium, node or the npm package cannot be had.
set -u
here=${BASH_SOURCE[0]%/*}
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
cd "$here" || exit 1

skip() {
  echo "SKIP browser-page: $*"
  exit 77
}

[ -x /usr/bin/chromium ] || skip "/usr/bin/chromium is missing (apt-get install chromium)"
command -v node >/dev/null 2>&1 || skip "node is missing (apt-get install nodejs npm)"
node -e 'process.exit(+process.versions.node.split(".")[0] >= 20 ? 0 : 1)' \
  || skip "node $(node --version) is too old for playwright-core (needs 20 or newer)"

if [ ! -d node_modules/playwright-core ]; then
  command -v npm >/dev/null 2>&1 || skip "npm is missing and node_modules is absent (apt-get install npm)"
  echo "# npm ci (node_modules is absent)"
  npm ci --no-audit --no-fund || skip "npm ci failed: node_modules could not be installed"
fi

exec node page_test.mjs
