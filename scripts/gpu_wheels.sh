#!/usr/bin/env bash
# Wheels that the GPU machine's image lacks and that cannot be fetched there (it reaches no registry): the metric
# packages of the generation tasks (rouge-score for wn-define; it imports absl-py, nltk, and nltk imports click and
# joblib). Run on a development machine; carry .whl in the device call, then on the GPU machine:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/study_site .whl/study/*.whl
#   PYTHONPATH=/tmp/study_site:. python3 scripts/study.py ...
#
# numpy, six, regex and tqdm come with the image (torch / transformers need them).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl/study
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$dest" absl-py nltk click joblib
# rouge-score 0.1.2 is published as an sdist only: build its (pure Python) wheel here
python3 -m pip wheel -q --no-deps -w "$dest" rouge-score==0.1.2
ls -l "$dest"
