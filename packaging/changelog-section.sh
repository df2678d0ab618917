#!/usr/bin/env bash
# Print the CHANGELOG.md section of one version (its body, without the "## [x.y.z]" heading):
#   packaging/changelog-section.sh 1.2.3 [CHANGELOG.md]      # also "Unreleased"
# Exits 1 when the section is missing or empty: a release needs its notes written first.
set -euo pipefail
version=${1:?usage: changelog-section.sh VERSION [CHANGELOG.md]}
file=${2:-$(dirname "$0")/../CHANGELOG.md}
awk -v v="$version" '
  /^## \[/ { if (found) exit; if (index($0, "## [" v "]") == 1) { found = 1; next } }
  found { print }
  END { if (!found) exit 1 }
' "$file" | sed -e '/./,$!d' >"${TMPDIR:-/tmp}/changelog-section.$$" || { echo "no section [$version] in $file" >&2; exit 1; }
if ! grep -q '[^[:space:]]' "${TMPDIR:-/tmp}/changelog-section.$$"; then
  rm -f "${TMPDIR:-/tmp}/changelog-section.$$"; echo "section [$version] in $file is empty" >&2; exit 1
fi
cat "${TMPDIR:-/tmp}/changelog-section.$$"; rm -f "${TMPDIR:-/tmp}/changelog-section.$$"
