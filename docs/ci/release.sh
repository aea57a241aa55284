#!/usr/bin/env bash
# The GitHub Actions recipes as one script, for any other CI (GitLab, Jenkins, Drone, …):
# run it in the built application's directory, after its build and dependency pruning.
#   RELEASE_SERVER  the server's URL            RELEASE_TOKEN  a ci token for SERVICE
#   SERVICE         the service's name          VERSION        a label (default: the commit)
#   ENVIRONMENT     where to deploy (default staging)
#   EXCLUDE         space-separated paths left out of the artifact (default: .env storage .git)
# Prints the digest; exits as `release deploy --wait` does (0 live, 7 failed and put back…).
# tests/it/recipes.rs runs it against a real server.
set -euo pipefail
: "${RELEASE_SERVER:?}" "${RELEASE_TOKEN:?}" "${SERVICE:?}"
ENVIRONMENT=${ENVIRONMENT:-staging}
commit=$(git rev-parse HEAD 2>/dev/null || true)
VERSION=${VERSION:-${commit:0:12}}

excludes=()
for path in ${EXCLUDE:-.env storage .git}; do
  excludes+=(--exclude "$path")
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

release package . -o "$work/app.tar.zst" "${excludes[@]}" >&2
digest=$(release upload "$work/app.tar.zst" --service "$SERVICE" ${VERSION:+--version "$VERSION"} \
  ${commit:+--git-sha "$commit"} ${BUILD_URL:+--build-url "$BUILD_URL"})
echo "$digest"
release deploy "$SERVICE" --env "$ENVIRONMENT" "$digest" --queue 10m --wait >&2
