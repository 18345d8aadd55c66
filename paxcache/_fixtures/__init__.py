"""Files shipped inside the package (declared as package data in pyproject.toml).

``tiny/`` is the trained tiny decoder that :func:`paxcache.nn.load_decoder` loads by
default (``config.json`` + ``params.msgpack``, made by ``python -m experiments.train_tiny``);
``tiny_corpus.txt`` is the 60 KB of template sentences it was trained on. The paths are
relative to this module, so they hold in an editable checkout and in an installed wheel.
"""

import pathlib

FIXTURES_DIR = pathlib.Path(__file__).resolve().parent
TINY_CHECKPOINT = str(FIXTURES_DIR / "tiny")
TINY_CORPUS = str(FIXTURES_DIR / "tiny_corpus.txt")
