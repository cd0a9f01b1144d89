import pytest
import torch

from ssmtune.data import (
    IGNORE_INDEX,
    Collator,
    ResumableBatchSampler,
    make_dataloader,
    tokenize_examples,
)
from ssmtune.tokenizer import ByteTokenizer, load_tokenizer

BYTES = ByteTokenizer()
EOS = BYTES.eos_token_id


def ex(input_, target, prefix=""):
    return {"input": input_, "target": target, "prefix": prefix}


def test_glue_style_no_eos_and_label_masking():
    ds = tokenize_examples([ex("Q: ab###", "1", prefix="Q: ")], BYTES, add_eos=False)
    (item,) = ds.items
    assert item["input_ids"] == list(b"Q: ab###1")
    assert item["labels"] == [IGNORE_INDEX] * 8 + [ord("1")]
    assert item["prompt_length"] == 8 and item["example_index"] == 0


def test_generation_appends_eos():
    ds = tokenize_examples([ex("abc###", "xy")], BYTES, add_eos=True)
    (item,) = ds.items
    assert item["input_ids"] == list(b"abc###xy") + [EOS]
    assert item["labels"] == [IGNORE_INDEX] * 6 + [ord("x"), ord("y"), EOS]


def test_left_truncation_never_cuts_the_target():
    exs = [ex("PRE:0123456789###", "ab", prefix="PRE:"), ex("ok###", "c")]
    ds = tokenize_examples(exs, BYTES, add_eos=True, max_length=10)
    first = ds.items[0]
    # 3 target tokens (a, b, EOS) leave 7 input tokens: the last 7 of the input.
    assert first["input_ids"][:7] == list(b"PRE:0123456789###")[-7:]
    assert first["input_ids"][7:] == [ord("a"), ord("b"), EOS]
    assert first["labels"] == [IGNORE_INDEX] * 7 + [ord("a"), ord("b"), EOS]
    assert ds.items[1]["input_ids"] == list(b"ok###c") + [EOS]
    assert ds.stats.num_truncated == 1 and ds.stats.num_kept == 2
    kept = tokenize_examples(exs, BYTES, add_eos=True, max_length=10, keep_prefix=True)
    assert kept.items[0]["input_ids"][:7] == list(b"PRE:") + list(b"###")
    assert "1 truncated" in ds.stats.summary()


def test_too_long_target_and_length_filter_drop():
    exs = [ex("in###", "a" * 20), ex("PREFIX-" + "x" * 5, "yy", prefix="PREFIX-"), ex("z", "w")]
    ds = tokenize_examples(exs, BYTES, add_eos=True, max_length=16)
    assert ds.stats.num_dropped_too_long == 1 and ds.stats.num_kept == 2
    assert [ds.example(i)["target"] for i in range(len(ds))] == ["yy", "w"]
    # The reference's filter counts input without the prefix + target (+ EOS): 5 + 3 = 8.
    assert tokenize_examples(exs[1:2], BYTES, add_eos=True, length_filter=8).stats.num_dropped_filter == 0
    ds = tokenize_examples(exs[1:2], BYTES, add_eos=True, length_filter=7)
    assert ds.stats.num_dropped_filter == 1 and len(ds) == 0


def test_missing_target_field_error():
    with pytest.raises(ValueError, match="no 'target' field"):
        tokenize_examples([{"input": "x"}], BYTES, add_eos=True)


def test_prefix_is_encoded_separately(bpe_folder):
    tok = load_tokenizer(bpe_folder)
    prefix, rest = "Determine if the given pair: ", "The cat sat on the mat.###"
    ds = tokenize_examples([ex(prefix + rest, "0", prefix=prefix)], tok, add_eos=False)
    assert ds.items[0]["input_ids"] == tok.encode(prefix) + tok.encode(rest) + tok.encode("0")
    joint = tokenize_examples(
        [ex(prefix + rest, "0", prefix=prefix)], tok, add_eos=False, encode_prefix_separately=False
    )
    assert joint.items[0]["input_ids"] == tok.encode(prefix + rest) + tok.encode("0")


def test_collate_right_pads():
    ds = tokenize_examples([ex("ab#", "c"), ex("abcde#", "fg")], BYTES, add_eos=True)
    batch = Collator(BYTES.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 9)
    assert batch["input_ids"][0].tolist() == list(b"ab#c") + [EOS] + [BYTES.pad_token_id] * 4
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [ord("c"), EOS] + [IGNORE_INDEX] * 4
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 4, [1] * 9]
    assert batch["prompt_lengths"].tolist() == [3, 6]
    padded = Collator(0, pad_to_multiple_of=8)([ds[0], ds[1]])
    assert padded["input_ids"].shape == (2, 16) and padded["input_ids"][0, 5:].eq(0).all()


def test_sampler_is_deterministic_and_per_epoch():
    a = ResumableBatchSampler(10, 3, seed=7)
    b = ResumableBatchSampler(10, 3, seed=7)
    e0a, e0b = list(a), list(b)
    assert e0a == e0b and len(e0a) == len(a) == 3  # the last incomplete batch is dropped
    flat = [i for batch in e0a for i in batch]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10)) and flat != sorted(flat)
    e1 = list(a)
    assert a.epoch == 2 and e1 != e0a
    assert list(ResumableBatchSampler(10, 3, seed=8)) != e0a
    unshuffled = list(ResumableBatchSampler(7, 3, shuffle=False, drop_last=False))
    assert unshuffled == [[0, 1, 2], [3, 4, 5], [6]]


def test_sampler_resumes_mid_epoch():
    full = ResumableBatchSampler(11, 2, seed=3)
    epoch0, epoch1 = list(full), list(full)
    partial = ResumableBatchSampler(11, 2, seed=3)
    it = iter(partial)
    seen = [next(it), next(it)]
    state = partial.state_dict()
    assert state == {"epoch": 0, "index": 4}
    resumed = ResumableBatchSampler(11, 2, seed=3)
    resumed.load_state_dict(state)
    assert seen + list(resumed) == epoch0
    assert list(resumed) == epoch1
    with pytest.raises(ValueError, match="index"):
        resumed.load_state_dict({"epoch": 0, "index": 99})


def test_make_dataloader_batches_and_resume():
    exs = [ex(f"in{i}#", str(i)) for i in range(9)]
    ds = tokenize_examples(exs, BYTES, add_eos=True)
    loader = make_dataloader(ds, 4, shuffle=True, seed=1, drop_last=True)
    batches = list(loader)
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 4 for b in batches)
    order = torch.cat([b["example_index"] for b in batches]).tolist()
    assert len(set(order)) == 8
    again = make_dataloader(ds, 4, shuffle=True, seed=1)
    first = next(iter(again))
    state = again.batch_sampler.state_dict()
    resumed = make_dataloader(ds, 4, shuffle=True, seed=1)
    resumed.batch_sampler.load_state_dict(state)
    rest = list(resumed)
    assert torch.equal(first["input_ids"], batches[0]["input_ids"])
    assert [b["example_index"].tolist() for b in rest] == [batches[1]["example_index"].tolist()]
    evaluation = make_dataloader(ds, 4, shuffle=False, drop_last=False)
    assert [b["example_index"].tolist() for b in evaluation] == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
