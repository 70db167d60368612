#!/usr/bin/env bash
# Type-check Grafana dashboards against Grafana's published schema types (@grafana/schema).
#
# Usage: monitoring/schema/check_dashboards.sh [DASHBOARD.json ...]
# Without arguments it checks monitoring/grafana/dashboards/*.json. Each file is wrapped as
# `export const d: Dashboard = <json>;` and compiled with `tsc --noEmit --strict`, which rejects
# wrong types, wrong enum values and missing required fields (not unknown keys inside panels'
# free-form `options`). Fields typed as TypeScript string enums (fieldConfig color mode,
# thresholds mode) reject the plain strings that Grafana itself writes, so the dashboards leave
# those fields to Grafana's defaults. Needs `npm install` in monitoring/schema first.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
tsc="$here/node_modules/.bin/tsc"
if [ ! -x "$tsc" ] || [ ! -d "$here/node_modules/@grafana/schema" ]; then
  echo "error: @grafana/schema and typescript are not installed; run: (cd $here && npm install)" >&2
  exit 2
fi

if [ $# -eq 0 ]; then
  set -- "$root"/monitoring/grafana/dashboards/*.json
fi

# A private directory per run, so concurrent checks do not overwrite each other's files.
mkdir -p "$here/build"
work="$(mktemp -d "$here/build/check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
printf '{"extends": "../../tsconfig.json", "include": ["*.ts"]}\n' > "$work/tsconfig.json"
for file in "$@"; do
  if [ ! -f "$file" ]; then
    echo "error: dashboard $file not found" >&2
    exit 2
  fi
  name="$(basename "$file" .json)"
  {
    echo "// Generated from $file by check_dashboards.sh."
    echo "import type { Dashboard } from '@grafana/schema';"
    printf 'export const d: Dashboard = '
    cat "$file"
    echo ';'
  } > "$work/$name.ts"
done

"$tsc" -p "$work/tsconfig.json"
version="$(node -p "require('$here/node_modules/@grafana/schema/package.json').version")"
echo "checked $# dashboard(s) against @grafana/schema $version"
