"""A big, bit-reproducible text corpus: the Python sources and docs of a pinned list of PyPI wheels.

`DISTRIBUTIONS` pins 151 pure-Python wheels (py3-none-any; MIT, BSD, Apache-2.0, PSF, ISC, and MPL-2.0 for
hypothesis and tqdm) by name, version, file name and sha256. Anyone with pip and PyPI rebuilds the same
documents, bit for bit:

    python -m moejax.datasets.pypi_corpus --download_dir=~/moejax_pypi_wheels [--tfds_data_dir=DIR]

It runs `pip download --no-deps --only-binary=:all: --require-hashes` for the wheels not already in the
download dir with the right hash (125 MB; pip checks each sha256, and wheels run no build step), checks
every sha256 again before reading an archive, writes array_record files (66 MB) into the tfds data dir
(default ~/tensorflow_datasets), reads them back to check the content hash and prints each split's
documents and bytes: 39 s on 2 CPU cores (download 24 s on a fast link, build 9 s, check 4 s; 0.5 GB of
memory). Training reads it with `DataConfig(source='pypi')`, which never downloads or builds it.

Documents: one per file of a wheel, in the order of their path '<name>-<version>/<path in the wheel>' (e.g.
'sympy-1.14.0/sympy/core/basic.py'): the files ending in .py .pyi .pyx .pxd .rst .md .txt and each
*.dist-info/METADATA (the package's README), skipping empty files, files over MAX_FILE_BYTES (1 MiB: 3
files), files with a NUL byte or not valid UTF-8 (none today; skipped rather than repaired, so every
document is a file's exact text), and files whose bytes equal an earlier document's (428 vendored copies,
2.2 MB: the first in path order stays, so no copy is in both splits). Features {'text', 'path'}.

Split by distribution: all of a distribution goes to 'validation' when `is_validation(name, VAL_FRACTION)`
(the sha256 of its name, not of its version, so a version bump does not move it), else to 'train'. No
package is in both splits, so the near-copies inside a package (sync/async twins, tests next to their code)
cannot leak from train into validation, which measures packages never seen in training. With
VAL_FRACTION = 0.1 it holds 15 distributions: mypy (37% of it, with its typeshed stubs), pyglet, sphinx,
ipython, trio, neo4j, gunicorn, boltons, bandit, ipykernel, attrs, mistune, prettytable, sortedcontainers,
pycodestyle.

Sizes: train 16,674 documents, 225.56 MB of UTF-8 text; validation 2,230 documents, 26.06 MB. The largest
distribution, sympy, is 10.4% of the text. Left out: generated API clients (kubernetes, twilio, stripe,
openai, elasticsearch, plotly), model zoos of copied code (transformers alone would be 54 MB, diffusers),
data more than code (faker, tensorflow-datasets, wcwidth), a second vendored typeshed (jedi), copyleft
(pylint, astroid, psycopg), and for size pyomo, awscli and tensorboard.

Content hash `CONTENT_SHA256`: each split's sha256 over its documents in path order, each as path, NUL, text
(UTF-8), NUL (no path or text holds a NUL byte), then the sha256 of the text
'train <train digest>\\nvalidation <validation digest>\\n'. The builder computes it while writing and fails,
leaving no prepared dataset, if it differs from the pinned value; metadata.json records it with each split's
documents, bytes and sha256, and the config name holds its first 16 hex digits. Two builds give the same
documents in the same storage order, but not byte-identical array_record files: tfds serializes each
example's two features in a per-process order (a protobuf map).

`TOKENIZER_8K` (pypi_spm8k.model, installed with moejax) is the 8K SentencePiece model of `moejax.tokenizer`
trained on all of the train split (78 s and 3.3 GB on 2 CPU cores; training twice gives the same file),
sha256 dae9b9ffa73ad9c5b7dd9dfea5f50fa0822e8cebb248d5040f06da120fcd469b: 3.31 bytes per token on the
validation split (for `DataConfig(source='pypi', tokenizer=TOKENIZER_8K)`).

    python -m moejax.tokenizer --source=pypi --vocab_size=8192 --max_bytes=250000000 --output=pypi_spm8k.model
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Iterable, Iterator, NamedTuple

import tensorflow_datasets as tfds

from moejax.datasets.text_files import SPLITS, ContentHash, is_validation

VAL_FRACTION = 0.1
TEXT_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".rst", ".md", ".txt")
MAX_FILE_BYTES = 1 << 20
DOWNLOAD_DIR = "~/moejax_pypi_wheels"
TOKENIZER_8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pypi_spm8k.model")
CONTENT_SHA256 = "994d9b678d131c1c9a5c17559af9d385de4214b15c9d60866f12948c754ed5f3"


class Dist(NamedTuple):
    """A pinned wheel: canonical PyPI name (lower case, '-'), version, wheel file name, sha256 of the file."""

    name: str
    version: str
    filename: str
    sha256: str


DISTRIBUTIONS = (  # sorted by name; licence after each
    Dist("aiosqlite", "0.22.1", "aiosqlite-0.22.1-py3-none-any.whl",
         "21c002eb13823fad740196c5a2e9d8e62f6243bd9e7e4a1f87fb5e44ecb4fceb"),  # MIT
    Dist("alembic", "1.20.1", "alembic-1.20.1-py3-none-any.whl",
         "9970712cfb81ea26c8658d378aaa5b8f6ff9146e5bb111d70497c164016cf598"),  # MIT
    Dist("altair", "6.3.0", "altair-6.3.0-py3-none-any.whl",
         "7defb6ca730676dfc99a299768e2769f51585fcb3dc960ea71aacc368929d65e"),  # BSD
    Dist("anyio", "4.16.0", "anyio-4.16.0-py3-none-any.whl",
         "c66ae634e0b8228396b801741beb3294326d4b6102f7bba4041c0dfb58c29026"),  # MIT
    Dist("arrow", "1.4.0", "arrow-1.4.0-py3-none-any.whl",
         "749f0769958ebdc79c173ff0b0670d59051a535fa26e8eba02953dc19eb43205"),  # Apache-2.0
    Dist("attrs", "26.1.0", "attrs-26.1.0-py3-none-any.whl",
         "c647aa4a12dfbad9333ca4e71fe62ddc36f4e63b2d260a37a8b83d2f043ac309"),  # MIT
    Dist("autopep8", "2.3.2", "autopep8-2.3.2-py2.py3-none-any.whl",
         "ce8ad498672c845a0c3de2629c15b635ec2b05ef8177a6e7c91c74f3e9b51128"),  # MIT
    Dist("babel", "2.19.0", "babel-2.19.0-py3-none-any.whl",
         "6d49734aed1d595b2c065d012174df8c83964692f26fc461702281634dd7555b"),  # BSD-3-Clause
    Dist("bandit", "1.9.4", "bandit-1.9.4-py3-none-any.whl",
         "f89ffa663767f5a0585ea075f01020207e966a9c0f2b9ef56a57c7963a3f6f8e"),  # Apache-2.0
    Dist("beautifulsoup4", "4.15.0", "beautifulsoup4-4.15.0-py3-none-any.whl",
         "d6f88de62e1d4e38ecb1077eb9724cd0eff29d2a08ca16a401e9b9e93f117cf9"),  # MIT
    Dist("black", "26.10.1", "black-26.10.1-py3-none-any.whl",
         "28842f9a8207cc1df6eb983a35a14c5a0dfcd603d214fe82d84bef552afd2e3a"),  # MIT
    Dist("boltons", "26.2.0", "boltons-26.2.0-py3-none-any.whl",
         "41942cbce440211bbcf2487ccdc356964ad674f95a01068b8a0dd7a1d1fed036"),  # BSD
    Dist("boto3", "1.44.8", "boto3-1.44.8-py3-none-any.whl",
         "099caf21553bbbfef118904aa02fadb8776a534704cf00bede0ed9f29a4da88e"),  # Apache-2.0
    Dist("botocore", "1.44.8", "botocore-1.44.8-py3-none-any.whl",
         "76342a76c338701db80dcb8afe1c9bd079283d6fffbb9d881442abb02a215043"),  # Apache-2.0
    Dist("cachetools", "8.0.2", "cachetools-8.0.2-py3-none-any.whl",
         "502bf3c17c6e35d78ccdaa70da8c7001b28634541f5cde0dee33c93bb252277d"),  # MIT
    Dist("celery", "5.7.0", "celery-5.7.0-py3-none-any.whl",
         "18310a9c919f9029e4735367484d93e6a25cdfd30afdc474622cc263d9b35f6e"),  # BSD-3-Clause
    Dist("click", "8.5.1", "click-8.5.1-py3-none-any.whl",
         "8bb5376d2006950386f8c6427613334a2acadc5f559cb80e638d00b4df957e37"),  # BSD-3-Clause
    Dist("colorama", "0.4.6", "colorama-0.4.6-py2.py3-none-any.whl",
         "4f1d9991f5acc0ca119f9d443620b77f9d6b33703e51011c16baf57afb285fc6"),  # BSD
    Dist("coverage", "7.17.5", "coverage-7.17.5-py3-none-any.whl",
         "6365cc9f34508faeaaf59ff82b45f6bbda0c823c731039edabc2bd8e774879a7"),  # Apache-2.0
    Dist("cython", "3.3.1", "cython-3.3.1-py3-none-any.whl",
         "61abc7feedd20dac6c4ff7ab3a30e17136a067b242ab9253e2b4a6d9a72c2b61"),  # Apache-2.0
    Dist("dask", "2026.8.0", "dask-2026.8.0-py3-none-any.whl",
         "ccc0c83a189b0398602435189771d28dad7b5773b6089bb8dce14ae732dd782c"),  # BSD-3-Clause
    Dist("datasets", "5.2.0", "datasets-5.2.0-py3-none-any.whl",
         "4be9e2882caaf5db13eadc39e93f3da2a995187b99acebac1595bf6c58dfa927"),  # Apache-2.0
    Dist("distributed", "2026.8.0", "distributed-2026.8.0-py3-none-any.whl",
         "3bd8882861a2cf497453f28c6b61135fa8ef2bb1d6885ad3b9f27e887e9c0e01"),  # BSD-3-Clause
    Dist("django", "5.2.19", "django-5.2.19-py3-none-any.whl",
         "5965d974a5218a2b68a11dd1276434707f23886525c23f0598eccedaf4f4ca00"),  # BSD-3-Clause
    Dist("docutils", "0.23", "docutils-0.23-py3-none-any.whl",
         "25d013af9bf23bc1c7b2b093dff4208166c53a94786c9e447808335ef1185fea"),  # public domain / BSD-2-Clause
    Dist("dulwich", "1.2.21", "dulwich-1.2.21-py3-none-any.whl",
         "31a522b9611e8032a43b8fb6941469c24e65ff4f14e0427986c58e90c22e154f"),  # Apache-2.0 OR GPL-2.0-or-later
    Dist("fabric", "3.2.3", "fabric-3.2.3-py3-none-any.whl",
         "ce61917f4f398018337ce279b357650a3a74baecf3fdd53a5839013944af965e"),  # BSD
    Dist("fastapi", "0.165.0", "fastapi-0.165.0-py3-none-any.whl",
         "896f48462042bb4f162147eb8fac7e858753dc1f486765709baf105d70e4fc5b"),  # MIT
    Dist("fire", "0.7.1", "fire-0.7.1-py3-none-any.whl",
         "e43fd8a5033a9001e7e2973bab96070694b9f12f2e0ecf96d4683971b5ab1882"),  # Apache-2.0
    Dist("flake8", "7.5.0", "flake8-7.5.0-py2.py3-none-any.whl",
         "637ea1a443a78ed6ee461725cdf71ca93bc5cde0abf25436dbebdc3880b4e078"),  # MIT
    Dist("flask", "3.1.3", "flask-3.1.3-py3-none-any.whl",
         "f4bcbefc124291925f1a26446da31a5178f9483862233b23c0c96a20701f670c"),  # BSD-3-Clause
    Dist("flax", "0.12.8", "flax-0.12.8-py3-none-any.whl",
         "807931d369cbc716fc447801ab39cd6c3c2614d573387a2319a028675dd34fe5"),  # Apache-2.0
    Dist("fonttools", "4.68.0", "fonttools-4.68.0-py3-none-any.whl",
         "d76f8fdcb6936f5e1045a0c9dd721a4bf11112e60d1e243bfa1d39f06a8b3104"),  # MIT
    Dist("gitpython", "3.2.1", "gitpython-3.2.1-py3-none-any.whl",
         "d66b0832aa8755c1a84892937282df0befb16c97e5a64aeebd68be9c5e323f53"),  # BSD-3-Clause
    Dist("google-auth", "2.63.0", "google_auth-2.63.0-py3-none-any.whl",
         "cbc065325f67511946d1a66672e4f47e71ed162ef1abd2bb8404ceec407c86ba"),  # Apache-2.0
    Dist("gunicorn", "27.0.1", "gunicorn-27.0.1-py3-none-any.whl",
         "378b26b9a38adcf4592f28828233c1716acc55e833ea06bf48719782efaa0d10"),  # MIT
    Dist("h11", "0.16.0", "h11-0.16.0-py3-none-any.whl",
         "63cf8bbe7522de3bf65932fda1d9c2772064ffb3dae62d55932da54b31cb6c86"),  # MIT
    Dist("hatchling", "1.33.0", "hatchling-1.33.0-py3-none-any.whl",
         "415290b84f464d2884303fca8974d38e7b85579069fab02a15db0828fbb1446d"),  # MIT
    Dist("html5lib", "1.1", "html5lib-1.1-py2.py3-none-any.whl",
         "0d78f8fde1c230e99fe37986a60526d7049ed4bf8a9fadbad5f00e22e58e041d"),  # MIT
    Dist("httpcore", "1.0.9", "httpcore-1.0.9-py3-none-any.whl",
         "2d400746a40668fc9dec9810239072b40b4484b640a8c38fd654a024c7a1bf55"),  # BSD-3-Clause
    Dist("httpx", "0.28.1", "httpx-0.28.1-py3-none-any.whl",
         "d909fcccc110f8c7faf814ca82a9a4d816bc5a6dbfea25d6591d6985b8ba59ad"),  # BSD
    Dist("huggingface-hub", "2.4.0", "huggingface_hub-2.4.0-py3-none-any.whl",
         "42ecfd93ede47bdd333daebbf66a32d7bfe2e18752754fe4d2d4f98a0179d801"),  # Apache-2.0
    Dist("hypothesis", "6.155.7", "hypothesis-6.155.7-py3-none-any.whl",
         "9f634bdb1f9e9b8ab6ba09431cf2deedb750c96978125a6fb3c5a0f6c6db4131"),  # MPL-2.0
    Dist("iniconfig", "2.3.1", "iniconfig-2.3.1-py3-none-any.whl",
         "9121e2c1fdb355232495be3194c8dfe87ccc2d5dee45947b78e68f499790d7a7"),  # MIT
    Dist("invoke", "3.0.3", "invoke-3.0.3-py3-none-any.whl",
         "f11327165e5cbb89b2ad1d88d3292b5113332c43b8553b494da435d6ec6f5053"),  # BSD-2-Clause
    Dist("ipykernel", "7.4.0", "ipykernel-7.4.0-py3-none-any.whl",
         "a6757f790ddc5a6006b813d82da1a9dbb65b3a00f2b6607df776418c6566ec1c"),  # BSD-3-Clause
    Dist("ipython", "9.18.1", "ipython-9.18.1-py3-none-any.whl",
         "997ce9140d374531a61069c70c0f9ef299d6dd3559ea0f94b8af589726e3c1d5"),  # BSD-3-Clause
    Dist("isort", "9.0.2", "isort-9.0.2-py3-none-any.whl",
         "6c29deeb39698a8717823b7f75b2ac58c5e8ab8dcf6cf31205a72a6617fb454e"),  # MIT
    Dist("jax", "0.10.2", "jax-0.10.2-py3-none-any.whl",
         "724d73c4678d8b06f6a6ab4db1b8a2fea8cd4f1e2c2564f99601634ec7b8d1c6"),  # Apache-2.0
    Dist("jinja2", "3.1.6", "jinja2-3.1.6-py3-none-any.whl",
         "85ece4451f492d0c13c5dd7c13a64681a86afae63a5f347908daf103ce6d2f67"),  # BSD
    Dist("jsonschema", "4.26.0", "jsonschema-4.26.0-py3-none-any.whl",
         "d489f15263b8d200f8387e64b4c3a75f06629559fb73deb8fdfb525f2dab50ce"),  # MIT
    Dist("jupyter-client", "8.10.0", "jupyter_client-8.10.0-py3-none-any.whl",
         "5f73f24f22fa25192cfff6b23c051932a2473a797b05734aff495b392103e14e"),  # BSD
    Dist("jupyter-server", "2.21.1", "jupyter_server-2.21.1-py3-none-any.whl",
         "2a6467606af7dbae2e7e31640030025969e15db6a649eae334af90415dc71dca"),  # BSD
    Dist("kafka-python", "3.0.12", "kafka_python-3.0.12-py3-none-any.whl",
         "67add72052e3ad0c37ed9963ebe2b1696adc7f063c64eaf19862c21b69a64a18"),  # Apache-2.0
    Dist("keras", "3.15.1", "keras-3.15.1-py3-none-any.whl",
         "836460e480930acbd19bb7a17e62f9ecad40e8a9af9a651fc8d0586a96d27e20"),  # Apache-2.0
    Dist("kombu", "5.7.0", "kombu-5.7.0-py3-none-any.whl",
         "dede73bff4c89175be382c4203d2f167cf7017c384396ec75c36a1b5678f1587"),  # BSD-3-Clause
    Dist("lark", "1.3.1", "lark-1.3.1-py3-none-any.whl",
         "c629b661023a014c37da873b4ff58a817398d12635d3bbb2c5a03be7fe5d1e12"),  # MIT
    Dist("loguru", "0.7.3", "loguru-0.7.3-py3-none-any.whl",
         "31a33c10c8e1e10422bfd431aeb5d351c7cf7fa671e3c4df004162264b28220c"),  # MIT
    Dist("mako", "1.4.3", "mako-1.4.3-py3-none-any.whl",
         "723296007c870bfd6b3f0c3230dba7198096e5269297ebf5e4eff9e7ffa39d4f"),  # MIT
    Dist("markdown", "3.11.3", "markdown-3.11.3-py3-none-any.whl",
         "e1a31a112232504d753e5c01bb8c2de90d3f0ba986b063e10770cf7695b09e73"),  # BSD-3-Clause
    Dist("marshmallow", "4.4.0", "marshmallow-4.4.0-py3-none-any.whl",
         "03a882ff2eabb9a4e24b433c2949f359ef4d172a12fdc14cde10375fd55328b4"),  # MIT
    Dist("matplotlib-inline", "0.2.2", "matplotlib_inline-0.2.2-py3-none-any.whl",
         "3c821cf1c209f59fb2d2d64abbf5b23b67bcb2210d663f9918dd851c6da1fcf6"),  # BSD-3-Clause
    Dist("mistune", "3.4.0", "mistune-3.4.0-py3-none-any.whl",
         "d03cec4c8620f21517a996d82d14f3b59c30d79bda2cc6c56bd32b839f18ce6b"),  # BSD
    Dist("mkdocs", "1.6.1", "mkdocs-1.6.1-py3-none-any.whl",
         "db91759624d1647f3f34aa0c3f327dd2601beae39a366d6e064c03468d35c20e"),  # BSD-2-Clause
    Dist("more-itertools", "11.2.1", "more_itertools-11.2.1-py3-none-any.whl",
         "35a7377edd1dd6608dcb2cdf534ded55ea32d49448875ad042cd3f879fb1ded0"),  # MIT
    Dist("moto", "5.2.5", "moto-5.2.5-py3-none-any.whl",
         "eef62cdcf3bfe73e0863743511ba042dfaba04ba3d5ecdcb896a196c693ad528"),  # Apache-2.0
    Dist("mpmath", "1.4.1", "mpmath-1.4.1-py3-none-any.whl",
         "dc4f0ea2304480d4a9a48a94c1020571558ade522b44a6912efac63a586e140f"),  # BSD-3-Clause
    Dist("mypy", "2.4.1", "mypy-2.4.1-py3-none-any.whl",
         "1784648d6ec8c2b5465e3f26241b845a0b3cb4e56c993c64abe16989e7698999"),  # MIT
    Dist("myst-parser", "5.2.0", "myst_parser-5.2.0-py3-none-any.whl",
         "517c91da81e6898c6aaa223c236f384e6f5cc5d14ab7df38b11164862c1b6e1a"),  # MIT
    Dist("narwhals", "2.29.0", "narwhals-2.29.0-py3-none-any.whl",
         "1c69b3dc30240f6e848c5a673cafc86affa44184ecce721e25b7194663ad10dc"),  # MIT
    Dist("nbconvert", "7.17.2", "nbconvert-7.17.2-py3-none-any.whl",
         "6a143c11c00bf831604da4b1be4347d36ea52367057eb920135d69bc2862fed2"),  # BSD
    Dist("nbformat", "5.11.1", "nbformat-5.11.1-py3-none-any.whl",
         "cc6698fa75f4fab8755ead786317815f13a6fee3b53311c0abb1a8b51d52f7ec"),  # BSD
    Dist("neo4j", "6.4.1", "neo4j-6.4.1-py3-none-any.whl",
         "f56a281c74355522fc2642df8919bec450115431531b8f3f6fe1cc17acb57a27"),  # Apache-2.0 AND Python-2.0
    Dist("networkx", "3.6.1", "networkx-3.6.1-py3-none-any.whl",
         "d47fbf302e7d9cbbb9e2555a0d267983d2aa476bac30e90dfbe5669bd57f3762"),  # BSD-3-Clause
    Dist("nltk", "3.10.4", "nltk-3.10.4-py3-none-any.whl",
         "769ba5413f265b7d3e87cd163cc28efa01e29eeef8bb6080bc907949d9fcfb51"),  # Apache-2.0
    Dist("nox", "2026.10.20", "nox-2026.10.20-py3-none-any.whl",
         "7aff12bb01471f5b087ada34cf0dbe452b02d840593f2e2afecc4bf6e6d6cd3f"),  # Apache-2.0
    Dist("numpydoc", "1.11.0", "numpydoc-1.11.0-py3-none-any.whl",
         "493ad2ce0d8275ca5da484ec37dbdbbc1334c3a6968dffd10ec729b51753e15e"),  # BSD
    Dist("openpyxl", "3.1.5", "openpyxl-3.1.5-py2.py3-none-any.whl",
         "5282c12b107bffeef825f4617dc029afaf41d0ea60823bbb665ef3079dc79de2"),  # MIT
    Dist("optax", "0.2.8", "optax-0.2.8-py3-none-any.whl",
         "e3ca2d36c99daab1800ae9dbc0545034382d6bc780b24d969e1b0df65fa31cb4"),  # Apache-2.0
    Dist("packaging", "26.4", "packaging-26.4-py3-none-any.whl",
         "81383611a09c1bc0b08b76e0fd5829d7c6824c65b27a6aee339da133f4233ea2"),  # Apache-2.0 OR BSD-2-Clause
    Dist("paho-mqtt", "2.2.0", "paho_mqtt-2.2.0-py3-none-any.whl",
         "3243630f7c2b05f71d1de8c6f59865eb04d3a59ae8c866e92377faed6753db4d"),  # EPL-2.0 OR BSD-3-Clause
    Dist("pandas-stubs", "3.1.0.261029", "pandas_stubs-3.1.0.261029-py3-none-any.whl",
         "70f631f2d0781c4500b1cd5f84cab7d7279a3d114674d69655536a4a99a3a67f"),  # BSD-3-Clause
    Dist("parso", "0.8.7", "parso-0.8.7-py2.py3-none-any.whl",
         "a8926eb2a1b915486941fdbd31e86a4baf88fe8c210f25f2f35ecec5b574ca1c"),  # MIT
    Dist("pdm", "2.29.4", "pdm-2.29.4-py3-none-any.whl",
         "599a299d7fb35195d41610ee8341f65c75c5c97dde9f8cfcf573790b3d1b0cd9"),  # MIT
    Dist("peewee", "4.5.3", "peewee-4.5.3-py3-none-any.whl",
         "4c5db9d2a3c4ae9a5725b229c29af51dbd063193f3a6c03b837974a90e44548c"),  # MIT
    Dist("pexpect", "4.9.0", "pexpect-4.9.0-py2.py3-none-any.whl",
         "7236d1e080e4936be2dc3e326cec0af72acf9212a7e1d060210e70a47e253523"),  # ISC
    Dist("pika", "1.4.4", "pika-1.4.4-py3-none-any.whl",
         "48de960c97a93b55db06b8be4c53eb977c9c8a2754c57cdae9097abcbd70ce04"),  # BSD
    Dist("pint", "0.25.3", "pint-0.25.3-py3-none-any.whl",
         "27eb25143bd5de9fcc4d5a4b484f16faf6b4615aa93ece6b3373a8c1a3c1b97d"),  # BSD
    Dist("pip", "26.3", "pip-26.3-py3-none-any.whl",
         "f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13"),  # MIT
    Dist("pluggy", "1.7.0", "pluggy-1.7.0-py3-none-any.whl",
         "7dd7b0d8832ba3cb632c306926ded123429211b83641b35dc5c41ad2d34f9bec"),  # MIT
    Dist("poetry-core", "2.5.0", "poetry_core-2.5.0-py3-none-any.whl",
         "98ee465b66f7e14bb9fbe68fb5e00d0cff184f036993ec94610ae4b5612f3add"),  # MIT
    Dist("pre-commit", "4.7.0", "pre_commit-4.7.0-py2.py3-none-any.whl",
         "2e229038ad3656081b70c27913157e4b636ef306f643f024a8a8e3f0f7b2f877"),  # MIT
    Dist("prettytable", "3.18.0", "prettytable-3.18.0-py3-none-any.whl",
         "b3346e0e6f79180833aebaac088ae926340586cf6d7d991b9eb125b65f72313a"),  # BSD-3-Clause
    Dist("prompt-toolkit", "3.0.53", "prompt_toolkit-3.0.53-py3-none-any.whl",
         "01c0891d7f9237d5e339f7d3e42cdae80b7534abb1c7c0e3352efba6231492f2"),  # BSD
    Dist("protobuf", "7.36.2", "protobuf-7.36.2-py3-none-any.whl",
         "bdb3a345d48db958e6ce1f18e508beb0cc981d64f24088427549c866cd039f1e"),  # BSD-3-Clause
    Dist("pyasn1", "0.6.5", "pyasn1-0.6.5-py3-none-any.whl",
         "4017b0fce125096b8573b39c989fdb1a4b19cf761e683398184550fea0e66587"),  # BSD-2-Clause
    Dist("pycodestyle", "2.15.0", "pycodestyle-2.15.0-py2.py3-none-any.whl",
         "12fd2f73c7b8ee8845a0431111df8faf4c1a07d6e64e2ee7f0c74014dab14181"),  # MIT
    Dist("pycparser", "3.12", "pycparser-3.12-py3-none-any.whl",
         "a076f3f489b39b43ed13563a1dafe42447445bec2e294154ec5c57fcdda4c85e"),  # BSD-3-Clause
    Dist("pydantic", "2.14.4", "pydantic-2.14.4-py3-none-any.whl",
         "653a2ad9f6d8858529c77c72717d0ea991d6c6837fe683246b2f4b2bbfc3fadc"),  # MIT
    Dist("pyflakes", "4.1.0", "pyflakes-4.1.0-py2.py3-none-any.whl",
         "b2e05e6bac8e49b67be2a6ffa63422c60f7193fc72e8180255907b41ec997dc1"),  # MIT
    Dist("pyglet", "2.1.19", "pyglet-2.1.19-py3-none-any.whl",
         "5ba6e8cb0b5ac56a284e43ab411e2bbd504191c32a765abdbd6a6c4b7f1ca317"),  # BSD-3-Clause
    Dist("pygments", "2.21.0", "pygments-2.21.0-py3-none-any.whl",
         "2363c69b61c4a97c838da3b130dcd6468f4848992b21a82f2a63ec34377137d9"),  # BSD-2-Clause
    Dist("pymysql", "1.2.4", "pymysql-1.2.4-py3-none-any.whl",
         "e169bed906168fffd0088925f45b3df024c2775c6fd128da0df773d47c458840"),  # MIT
    Dist("pyparsing", "3.3.3", "pyparsing-3.3.3-py3-none-any.whl",
         "ece8c00a69cf01b45d0b1dedabb469c90d8caf996d4fda40f147627a122849a4"),  # MIT
    Dist("pyserial", "3.5", "pyserial-3.5-py2.py3-none-any.whl",
         "c4451db6ba391ca6ca299fb3ec7bae67a5c55dde170964c7a14ceefec02f2cf0"),  # BSD
    Dist("pytest", "9.2.0", "pytest-9.2.0-py3-none-any.whl",
         "07acdcf88ec174f907dc01af70bf52d49b014bbab03faeeade31c96b18c2e588"),  # MIT
    Dist("python-dateutil", "4.0.0", "python_dateutil-4.0.0-py3-none-any.whl",
         "a5e246f79eb80475e691bf93862cead98decd8a498cf53ba0516fcdc0f50dc1c"),  # BSD-3-Clause
    Dist("redis", "8.1.0", "redis-8.1.0-py3-none-any.whl",
         "a4fe1aac3d3b3cc791d4b3d5931c5a956045dc951ee74d1c913ee3ac4d2ee9fb"),  # MIT
    Dist("requests", "2.34.2", "requests-2.34.2-py3-none-any.whl",
         "2a0d60c172f83ac6ab31e4554906c0f3b3588d37b5cb939b1c061f4907e278e0"),  # Apache-2.0
    Dist("rich", "15.0.0", "rich-15.0.0-py3-none-any.whl",
         "33bd4ef74232fb73fe9279a257718407f169c09b78a87ad3d296f548e27de0bb"),  # MIT
    Dist("rsa", "4.9.1", "rsa-4.9.1-py3-none-any.whl",
         "68635866661c6836b8d39430f97a996acbd61bfa49406748ea243539fe239762"),  # Apache-2.0
    Dist("ruamel-yaml", "0.19.1", "ruamel_yaml-0.19.1-py3-none-any.whl",
         "27592957fedf6e0b62f281e96effd28043345e0e66001f97683aa9a40c667c93"),  # MIT
    Dist("scikit-build-core", "1.1.2", "scikit_build_core-1.1.2-py3-none-any.whl",
         "7f4f959a467692db50bdd1ea7ce1507f2c7972e6023b753ee302d169bc4cec85"),  # Apache-2.0
    Dist("scrapy", "2.19.0", "scrapy-2.19.0-py3-none-any.whl",
         "44c1ad4b008f1976e946c75b2adce0e448cbfe470c584b1b59469abf270e8013"),  # BSD-3-Clause
    Dist("seaborn", "0.13.2", "seaborn-0.13.2-py3-none-any.whl",
         "636f8336facf092165e27924f223d3c62ca560b1f2bb5dff7ab7fad265361987"),  # BSD
    Dist("sentry-sdk", "2.75.0", "sentry_sdk-2.75.0-py3-none-any.whl",
         "9a10e97de2cbd42ad7e4a6e02a0d5af19de9811eb02445077d41ba14c08e170c"),  # MIT
    Dist("setuptools", "84.2.1", "setuptools-84.2.1-py3-none-any.whl",
         "ca140b45d5325a9478f880e351484f62fef15f336462e449ca0c03c873d589c2"),  # MIT
    Dist("setuptools-scm", "10.3.4", "setuptools_scm-10.3.4-py3-none-any.whl",
         "82f34c3e3084fc2b57d397200637cc13f2338004052d2fee47baa5f0e902464e"),  # MIT
    Dist("sortedcontainers", "2.4.0", "sortedcontainers-2.4.0-py2.py3-none-any.whl",
         "a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0"),  # Apache-2.0
    Dist("sphinx", "9.0.4", "sphinx-9.0.4-py3-none-any.whl",
         "5bebc595a5e943ea248b99c13814c1c5e10b3ece718976824ffa7959ff95fffb"),  # BSD-2-Clause
    Dist("sqlalchemy", "2.1.9", "sqlalchemy-2.1.9-py3-none-any.whl",
         "449fed5c2caa3b278cc57499d09db001fb3f28dc7f18affc48142aee4dcc0cdf"),  # MIT
    Dist("sqlglot", "30.30.0", "sqlglot-30.30.0-py3-none-any.whl",
         "06c4c212a7868c7dcff0fd0fda348dd3c5cbad40137b3083a70ecdfe22921cf9"),  # MIT
    Dist("sqlmodel", "0.0.50", "sqlmodel-0.0.50-py3-none-any.whl",
         "df518bc74287e1da0b0d7833cd00f55e77cb1cdc8c27bc29f77eea27acb51c1a"),  # MIT
    Dist("sqlparse", "0.6.1", "sqlparse-0.6.1-py3-none-any.whl",
         "3be5a72d04c873d690d7c6dedd33d6fae2ef82759881ceec02fc2efd0cba564f"),  # BSD
    Dist("starlette", "1.10.0", "starlette-1.10.0-py3-none-any.whl",
         "478c0ab3b4ced6e82719849c118fa406f0278a3499c1a898cd15cd31bdc38ce4"),  # BSD-3-Clause
    Dist("streamlit", "1.67.0", "streamlit-1.67.0-py3-none-any.whl",
         "f29da87c443bfbdfc52738616e3d65745d438e718da8faf69e2be0da1e52ce64"),  # Apache-2.0
    Dist("structlog", "26.1.0", "structlog-26.1.0-py3-none-any.whl",
         "e081a26d6c373e6d201eca24eede26d8ffab07f88f477822e679183428d3d91e"),  # MIT OR Apache-2.0
    Dist("sympy", "1.14.0", "sympy-1.14.0-py3-none-any.whl",
         "e091cc3e99d2141a0ba2847328f5479b05d94a6635cb96148ccb3f34671bd8f5"),  # BSD
    Dist("tabulate", "0.10.0", "tabulate-0.10.0-py3-none-any.whl",
         "f0b0622e567335c8fabaaa659f1b33bcb6ddfe2e496071b743aa113f8774f2d3"),  # MIT
    Dist("tenacity", "9.2.1", "tenacity-9.2.1-py3-none-any.whl",
         "9e56f17539296baab7beabb08b92f6ee3d7be92d8be72d763360677c2ad6580e"),  # Apache-2.0
    Dist("termcolor", "3.3.0", "termcolor-3.3.0-py3-none-any.whl",
         "cf642efadaf0a8ebbbf4bc7a31cec2f9b5f21a9f726f4ccbb08192c9c26f43a5"),  # MIT
    Dist("textual", "8.2.8", "textual-8.2.8-py3-none-any.whl",
         "267375fd402dc8d981457212efa71f0e3365fd17bba144ba9bb3ed7563cb374a"),  # MIT
    Dist("tomli", "2.5.0", "tomli-2.5.0-py3-none-any.whl",
         "32a7b79ac57a2e83670ce329ccf675798bc5a2094783a63676866b70503f2e2b"),  # MIT
    Dist("tomlkit", "0.15.2", "tomlkit-0.15.2-py3-none-any.whl",
         "05562412163a3037b94497385fb7f9204c637bc605af7a48199e41cf2272f437"),  # MIT
    Dist("toolz", "1.2.0", "toolz-1.2.0-py3-none-any.whl",
         "890f820b1cb8152785aaf9386d8707770110809035800985ca65cb24ce1120ef"),  # BSD-3-Clause
    Dist("tox", "4.67.15", "tox-4.67.15-py3-none-any.whl",
         "963219a3c5e4544408b19087b0c1a41932fc792d9ae0c40438aec4e88c48c676"),  # MIT
    Dist("tqdm", "4.70.1", "tqdm-4.70.1-py3-none-any.whl",
         "c293e525e6fef9c20e8728fd4612df02a0aa31bb5fe91ecd93e123b1b7bffa73"),  # MPL-2.0 AND MIT
    Dist("traitlets", "5.16.1", "traitlets-5.16.1-py3-none-any.whl",
         "f775618166caa0396c8e337099240f2bd3e5e917d203b2e6fbe21a58d3cb1f6b"),  # BSD
    Dist("trimesh", "5.2.0", "trimesh-5.2.0-py3-none-any.whl",
         "04db2c7ec62afdd7763fb04c82bb5f257ddd984993a19ee83697f475fc58fd29"),  # MIT
    Dist("trio", "0.35.0", "trio-0.35.0-py3-none-any.whl",
         "9a062a029487c1bdbcc1b2543b729a0bde857ce478b1512c84f391f628e0c5c9"),  # MIT OR Apache-2.0
    Dist("twisted", "26.10.0", "twisted-26.10.0-py3-none-any.whl",
         "3732f42af218925a0fe78d6668db55853f7fb532245a89a2669babe7d3000fa8"),  # MIT
    Dist("typeguard", "4.6.1", "typeguard-4.6.1-py3-none-any.whl",
         "aca1f365124873d5325b18aad1a3689d62f7184abe32d899413562cf51729d02"),  # MIT
    Dist("typer", "0.29.2", "typer-0.29.2-py3-none-any.whl",
         "f30731f8ca758368b836b3714872e58e395cef8fcaff918c853b1969ed5274e7"),  # MIT
    Dist("typing-extensions", "4.16.0", "typing_extensions-4.16.0-py3-none-any.whl",
         "481caa481374e813c1b176ada14e97f1f67a4539ce9cfeb3f350d78d6370c2e8"),  # PSF-2.0
    Dist("urllib3", "2.8.0", "urllib3-2.8.0-py3-none-any.whl",
         "0cf3cae568d36aa9576b28dfb35f11328f1cb974ca7647d9475ebb86c75ac6e3"),  # MIT
    Dist("uvicorn", "0.54.0", "uvicorn-0.54.0-py3-none-any.whl",
         "505bdb0f318731d45f1f712071fc781a8981f6847a31c902c9f5e652d4f67faf"),  # BSD-3-Clause
    Dist("virtualenv", "21.15.11", "virtualenv-21.15.11-py3-none-any.whl",
         "0390c40275487b5e677a1e559e30204ff061db4c5fec39c81d0dff1b24d2b774"),  # MIT
    Dist("werkzeug", "3.1.9", "werkzeug-3.1.9-py3-none-any.whl",
         "6392e50c78460ba618e5b21f08a71f59c99ce99cdc6cf6e3dd7e6ccca8754fab"),  # BSD-3-Clause
    Dist("wheel", "0.48.0", "wheel-0.48.0-py3-none-any.whl",
         "3217dcc807155e45db462d7ef2431f5ddda0d7273b700d05a67b271ceb1287ab"),  # MIT
    Dist("xarray", "2026.9.0", "xarray-2026.9.0-py3-none-any.whl",
         "fe349fa871628b1a0a5217af3fe1283a2862d5485156e6eda354fffb81c3bb7c"),  # Apache-2.0
    Dist("yapf", "0.43.0", "yapf-0.43.0-py3-none-any.whl",
         "224faffbc39c428cb095818cf6ef5511fdab6f7430a10783fdfb292ccf2852ca"),  # Apache-2.0
)


def build_command(data_dir: str | None = None) -> str:
    """The shell command that downloads and builds the corpus (into data_dir, else the tfds default)."""
    return (f"python -m moejax.datasets.pypi_corpus --download_dir={DOWNLOAD_DIR}"
            + (f" --tfds_data_dir={data_dir}" if data_dir else ""))


def split_of(dist: Dist) -> str:
    return "validation" if is_validation(dist.name, VAL_FRACTION) else "train"


def read_archive(download_dir: str, dist: Dist) -> bytes:
    """The bytes of dist's wheel in download_dir, after checking their sha256 (one-line errors)."""
    path = os.path.join(os.path.expanduser(download_dir), dist.filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; download the pinned wheels with `{build_command()}`")
    with open(path, "rb") as f:
        data = f.read()
    found = hashlib.sha256(data).hexdigest()
    if found != dist.sha256:
        raise ValueError(f"{path}: sha256 {found}, expected {dist.sha256} (delete it and run `{build_command()}`)")
    return data


def _is_text(name: str) -> bool:
    return name.endswith(TEXT_SUFFIXES) or (name.endswith("/METADATA") and name.count("/") == 1
                                            and name.split("/")[0].endswith(".dist-info"))


def documents(download_dir: str, dists: Iterable[Dist] | None = None) -> Iterator[tuple[str, str, str]]:
    """(split, path, text) of every document of the wheels, in path order (see the module docstring)."""
    seen = set()  # sha256 of the documents so far
    for dist in sorted(DISTRIBUTIONS if dists is None else dists, key=lambda d: f"{d.name}-{d.version}/"):
        split, prefix = split_of(dist), f"{dist.name}-{dist.version}/"
        with zipfile.ZipFile(io.BytesIO(read_archive(download_dir, dist))) as wheel:
            for info in sorted(wheel.infolist(), key=lambda i: i.filename):
                if info.is_dir() or not _is_text(info.filename) or not 0 < info.file_size <= MAX_FILE_BYTES:
                    continue
                data = wheel.read(info)
                digest = hashlib.sha256(data).digest()
                if b"\0" in data or digest in seen:
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                seen.add(digest)
                yield split, prefix + info.filename, text


@dataclasses.dataclass
class PypiConfig(tfds.core.BuilderConfig):
    """The pinned wheels and the content hash their documents must have."""

    dists: tuple[Dist, ...] = dataclasses.field(default=(), repr=False)
    content_sha256: str = ""


def pypi_config() -> PypiConfig:
    """The config of the pinned corpus (`DISTRIBUTIONS`, `CONTENT_SHA256`), named after its content hash."""
    return PypiConfig(name=f"content-{CONTENT_SHA256[:16]}", dists=tuple(DISTRIBUTIONS),
                      content_sha256=CONTENT_SHA256,
                      description=(f"Text files of {len(DISTRIBUTIONS)} pinned PyPI wheels "
                                   f"(moejax.datasets.pypi_corpus); content sha256 {CONTENT_SHA256}"))


class MoejaxPypi(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The pinned PyPI corpus, built from the wheels in the manual dir (the download dir)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "One example per text file of the pinned wheels; split by distribution."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Download and build with `{build_command()}`."
    code_path = None  # no checksums file next to the code (see text_files._TextFilesBuilder)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.builder_config.description, metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        for dist in self.builder_config.dists:  # every archive present and intact before anything is written
            read_archive(root, dist)
        self._hash = ContentHash()
        return {split: self._generate_examples(root, split) for split in SPLITS}

    def _generate_examples(self, root, split):
        for s, path, text in documents(root, self.builder_config.dists):
            if s == split:
                self._hash.update(s, path, text)
                yield path, {"text": text, "path": path}

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        found, expected = self._hash.hexdigest(), self.builder_config.content_sha256
        if found != expected:  # raised inside tfds' incomplete dir: nothing prepared is left behind
            raise ValueError(f"PyPI corpus content sha256 {found}, expected {expected}: the documents differ from "
                             "the pinned build (changed wheels or extraction code); no dataset was written")
        self.info.metadata.update(self._hash.metadata())


def pypi_builder(data_dir: str | None = None) -> MoejaxPypi:
    """The builder of the pinned corpus in data_dir (None: the tfds default); it may not be prepared yet."""
    return MoejaxPypi(config=pypi_config(), data_dir=os.path.expanduser(data_dir) if data_dir else None,
                      file_format="array_record")


def download(download_dir: str = DOWNLOAD_DIR, dists: Iterable[Dist] | None = None) -> list[Dist]:
    """pip-downloads the pinned wheels not already in download_dir with their sha256; returns those fetched."""
    download_dir = os.path.expanduser(download_dir)
    dists = DISTRIBUTIONS if dists is None else tuple(dists)
    missing = []
    for dist in dists:
        try:
            read_archive(download_dir, dist)
        except (FileNotFoundError, ValueError):
            missing.append(dist)
    if missing:
        os.makedirs(download_dir, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            requirements = os.path.join(tmp, "requirements.txt")
            with open(requirements, "w") as f:
                f.writelines(f"{d.name}=={d.version} --hash=sha256:{d.sha256}\n" for d in missing)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
                   "--ignore-requires-python", "--disable-pip-version-check", "-q", "-r", requirements,
                   "-d", download_dir]
            if subprocess.run(cmd).returncode:
                raise RuntimeError(f"`{' '.join(cmd)}` failed for {len(missing)} wheels (pip's error above)")
    for dist in dists:
        read_archive(download_dir, dist)
    return missing


def build(download_dir: str = DOWNLOAD_DIR, data_dir: str | None = None) -> MoejaxPypi:
    """Builds the corpus from the wheels in download_dir into data_dir (if not built yet); returns its builder."""
    builder = pypi_builder(data_dir)
    if not builder.is_prepared():
        manual_dir = os.path.expanduser(download_dir)
        for dist in builder.builder_config.dists:  # one-line errors before tfds looks at the directory
            read_archive(manual_dir, dist)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder


def verify(builder: MoejaxPypi) -> ContentHash:
    """The content hash of the prepared dataset as read back from its files."""
    content = ContentHash()
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        paths = [source[i]["path"] for i in range(len(source))]
        for i in sorted(range(len(source)), key=paths.__getitem__):
            content.update(split, paths[i].decode("utf-8"), source[i]["text"])
    return content


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--download_dir", default=DOWNLOAD_DIR, help="where the wheels are (or are downloaded to)")
    p.add_argument("--tfds_data_dir", default="", help="'' = $TFDS_DATA_DIR, else ~/tensorflow_datasets")
    a = p.parse_args(argv)
    t0 = time.time()
    fetched = download(a.download_dir)
    t1 = time.time()
    builder = build(a.download_dir, a.tfds_data_dir or None)
    t2 = time.time()
    content = verify(builder)
    t3 = time.time()
    for split in SPLITS:
        print(f"{split:10s} {content.docs[split]:7d} documents {content.bytes[split] / 1e6:8.2f} MB")
    ok = content.hexdigest() == CONTENT_SHA256
    print(f"content sha256 {content.hexdigest()} ({'matches' if ok else 'DIFFERS FROM'} the pinned value)\n"
          f"prepared in {builder.data_dir}\ndownload {t1 - t0:.0f} s ({len(fetched)} wheels fetched), "
          f"build {t2 - t1:.0f} s, verify {t3 - t2:.0f} s")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
