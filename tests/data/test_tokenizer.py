import json

import pytest

from ssmtune.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_byte_tokenizer_ids_and_roundtrip():
    tok = ByteTokenizer()
    assert tok.encode("A é") == [65, 32, 0xC3, 0xA9]
    assert tok.decode(tok.encode("héllo ###")) == "héllo ###"
    assert tok.eos_token_id == tok.pad_token_id == 256
    assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0
    assert tok.decode([104, 105, 256]) == "hi"
    assert tok.decode([104, 105, 256], skip_special_tokens=False) == "hi<|endoftext|>"
    # Special strings inside text stay bytes.
    assert tok.encode("<|endoftext|>") == list(b"<|endoftext|>")


def test_byte_tokenizer_sep_token():
    tok = ByteTokenizer(add_sep_token=True)
    assert tok.sep_token_id == 257 and tok.vocab_size == 264
    assert tok.decode([97, 257, 98], skip_special_tokens=False) == "a<|sep|>b"
    assert ByteTokenizer().sep_token_id is None


def test_load_byte_by_name():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_load_tokenizer_json(bpe_folder):
    tok = load_tokenizer(bpe_folder)
    assert isinstance(tok, HFTokenizer)
    text = "The cat sat on the mat.###"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 0 and tok.pad_token_id == 0
    import tokenizers

    assert tok.vocab_size == tokenizers.Tokenizer.from_file(str(bpe_folder / "tokenizer.json")).get_vocab_size() > 256
    # A file path works too, and no BOS/EOS is added by encode.
    assert load_tokenizer(bpe_folder / "tokenizer.json").encode(text) == ids
    assert tok.eos_token_id not in ids


def test_eos_from_special_tokens_map(bpe_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text((bpe_folder / "tokenizer.json").read_text())
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|padding|>"}, "pad_token": "<|endoftext|>"})
    )
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == 1 and tok.pad_token_id == 1


def test_missing_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*config.json"):
        load_tokenizer(tmp_path)
