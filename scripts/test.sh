#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone. It installs the packages that the tests
# of other languages and the SMTP test need, and builds the binaries that the end-to-end
# tests start. Then it runs every Rust test and doctest and validates the Kubernetes
# manifests.
set -euo pipefail

cd "$(dirname "$0")/.."

echo "== test dependencies"
# tests/tests/email_smtp.rs runs an SMTP server built on the Python package aiosmtpd, and
# tests/tests/other_languages.rs runs the Python and Node.js clients in tests/clients.
python3 -m pip install --quiet --disable-pip-version-check \
    -r tests/requirements.txt \
    -r tests/clients/python/requirements.txt \
    -r k8s/requirements.txt
npm ci --prefix tests/clients/node --no-audit --no-fund

echo "== Rust tests"
# The end-to-end tests run the binaries and the example that the build produces.
cargo build --workspace --bins --examples
cargo test --workspace

echo "== Kubernetes manifests"
# Renders k8s/ and validates every object against the Kubernetes JSON schemas, offline.
bash k8s/validate.sh
