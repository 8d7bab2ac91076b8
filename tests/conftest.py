"""Shared fixtures: the demo dataset preprocessed once per session with a tiny LLaMA tokenizer."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

_SESSION_CACHE: list[str] = []


def pytest_configure(config):
    """The tests never write the user's own cache (resources.py ``cache_root``): one folder for the session,
    shared by the xdist workers and every command they start (they inherit the variable), removed at the end."""
    from cllm4rec_dist.resources import CACHE_ENV

    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="cllm4rec-test-cache-")
        _SESSION_CACHE.append(os.environ[CACHE_ENV])


def pytest_unconfigure(config):
    for folder in _SESSION_CACHE:
        shutil.rmtree(folder, ignore_errors=True)

# The real data sets (../shared/data README): beside the checkout by default, anywhere else through this variable.
SHARED_DATA_ENV = "CLLM4REC_SHARED_DATA"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder; the tests that need it skip, saying how to point at it, where it is absent."""
    path = Path(os.environ.get(SHARED_DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (path / "movielens-100k").is_dir():
        pytest.skip(f"needs the real data sets: {path} has no movielens-100k/ (set {SHARED_DATA_ENV}=DIR to point "
                    f"at a checkout's shared/data)")
    return path


@pytest.fixture(scope="session")
def demo_raw(tmp_path_factory) -> str:
    from cllm4rec_dist.data.demo import DemoConfig, write

    out = tmp_path_factory.mktemp("demo_raw")
    write(str(out), DemoConfig(num_users=120, num_items=80, min_items_per_user=8, max_items_per_user=16))
    return str(out)


@pytest.fixture(scope="session")
def demo_data(demo_raw, tmp_path_factory) -> str:
    """A preprocessed (sharded) small demo dataset with its tiny-llama backbone in DIR/backbone."""
    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.readers import ReaderOptions

    out = str(tmp_path_factory.mktemp("demo_data") / "ds")
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[demo_raw]), out=out))
    return out


@pytest.fixture(scope="session")
def demo_loo_data(demo_raw, tmp_path_factory) -> str:
    """The same demo dataset preprocessed with the leave-one-out split (seq corpus, candidates, items.json)."""
    from cllm4rec_dist.corpus.preprocess import PreprocessConfig, preprocess
    from cllm4rec_dist.data.protocol import ProtocolConfig
    from cllm4rec_dist.data.readers import ReaderOptions

    out = str(tmp_path_factory.mktemp("demo_loo_data") / "ds")
    preprocess(PreprocessConfig(format="table", options=ReaderOptions(inputs=[demo_raw]), out=out,
                                protocol=ProtocolConfig(split="leave-one-out")))
    return out


FILM_TITLES = [f"Film {chr(65 + i % 26)}{i} ({1980 + i})" for i in range(40)]
"""The catalogue of the A-LLMRec unit tests: short titled items that the tiny backbone's tokenizer was built on."""


@pytest.fixture(scope="session")
def film_llm(tmp_path_factory) -> dict:
    """A tiny LLaMA saved as a checkpoint whose tokenizer knows FILM_TITLES (an LLM location, as the recipes take)."""
    from cllm4rec_dist.corpus.presets import build_backbone

    path = str(tmp_path_factory.mktemp("film_llm") / "tiny-llama")
    build_backbone("tiny-llama", path, texts=FILM_TITLES)
    return {"path": path, "gguf_file": None}
