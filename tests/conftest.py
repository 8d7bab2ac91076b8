"""Shared fixtures: the demo dataset preprocessed once per session with a tiny LLaMA tokenizer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
