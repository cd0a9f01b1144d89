"""Rebuild the built-in task files (and optionally the pretraining corpus) from Debian's wordnet-base.

    apt-get install wordnet-base
    python scripts/build_builtin_data.py [--corpus out/wordnet-corpus.txt]
"""

import argparse

from ssmtune.builtin.wordnet import build_corpus, build_tasks

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", help="also write the pretraining corpus to this path")
    args = ap.parse_args()
    print(build_tasks())
    if args.corpus:
        print(f"corpus: {build_corpus(args.corpus)} bytes -> {args.corpus}")
