"""Saved tiny model folders of every family, for the GGUF export tests (builders: fastsft.tiny_families)."""
import pytest

from fastsft.tiny_families import FAMILIES, build_model, build_tokenizer


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family -> a saved fp32 model folder with its tokenizer (built once per session)."""
    made = {}

    def get(family: str, tied=None):
        key = (family, tied)
        if key not in made:
            tokenizer = build_tokenizer(FAMILIES[family][1])
            extra = {} if tied is None else {"tie_word_embeddings": tied}
            model = build_model(family, tokenizer, **extra)
            folder = tmp_path_factory.mktemp(f"{family}-{tied}")
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[key] = folder
        return made[key]

    return get
