import pytest

CORPUS = [
    "Determine if the given pair of sentences displays entailment or not_entailment.",
    "The cat sat on the mat.###A cat was sitting.###",
    "hello world, hello there, generate text for the following RDF triples",
] * 3


@pytest.fixture(scope="session")
def bpe_folder(tmp_path_factory):
    """A folder with a tiny GPT-NeoX-style byte-level BPE tokenizer.json (<|endoftext|> = 0, <|padding|> = 1)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    folder = tmp_path_factory.mktemp("neox_like")
    tok.save(str(folder / "tokenizer.json"))
    return folder
