import json
import re
import sqlite3

import pytest

from ssmtune.data import GLUE_INSTRUCTIONS, TaskConfig, get_task, list_tasks, load_examples, train_val_split

RTE = GLUE_INSTRUCTIONS["rte"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_tsv(path, header, rows):
    lines = ([("\t".join(header))] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_registry_lists_all_tasks():
    expected = {
        "rte",
        "mrpc",
        "cola",
        "sst2",
        "qnli",
        "qqp",
        "mnli",
        "stsb",
        "wnli",
        "dart",
        "samsum",
        "spider",
        "jsonl",
    }
    assert expected <= set(list_tasks())
    assert get_task("SST-2").name == "sst2"
    with pytest.raises(ValueError, match=r"unknown task 'glue9'.*rte"):
        get_task("glue9")


def test_rte_prompt_formats_jsonl(tmp_path):
    rows = [{"sentence1": "A man eats.", "sentence2": "Someone eats.", "label": 0, "idx": 0}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    (ex,) = load_examples(TaskConfig(task="rte", data_dir=str(tmp_path)), "train")
    assert RTE == (
        "Determine if the given pair of sentences displays entailment or not_entailment. "
        "Respond with '0' if entailment or '1' if not_entailment: "
    )
    assert ex["input"] == RTE + "A man eats.###Someone eats.###"
    assert ex["target"] == "0" and ex["label"] == 0 and ex["prefix"] == RTE
    (ex,) = load_examples(TaskConfig(task="rte", data_dir=str(tmp_path), prompt_style="peft"), "train")
    assert ex["input"] == RTE + "###A man eats.###Someone eats.###"
    assert ex["prefix"] == RTE + "###"


def test_glue_raw_tsv_formats(tmp_path):
    # RTE / QNLI raw files name labels in words.
    write_tsv(tmp_path / "dev.tsv", ["index", "sentence1", "sentence2", "label"], [[0, "a", "b", "not_entailment"]])
    (ex,) = load_examples(TaskConfig(task="rte", data_dir=str(tmp_path)), "validation")
    assert ex["label"] == 1 and ex["target"] == "1"
    # MRPC's original columns; quotes are not special in GLUE TSVs.
    mrpc = tmp_path / "mrpc"
    mrpc.mkdir()
    write_tsv(
        mrpc / "train.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], [[1, 7, 8, 'He said "hi', "x"]]
    )
    (ex,) = load_examples(TaskConfig(task="mrpc", data_dir=str(mrpc)), "train")
    assert ex["input"] == GLUE_INSTRUCTIONS["mrpc"] + 'He said "hi###x###' and ex["label"] == 1
    # CoLA's raw TSV has no header; single-sentence tasks have no inner separator.
    cola = tmp_path / "cola"
    cola.mkdir()
    write_tsv(cola / "train.tsv", None, [["gj04", 0, "*", "Him sleeps."], ["gj04", 1, "", "He sleeps."]])
    exs = load_examples(TaskConfig(task="cola", data_dir=str(cola)), "train")
    assert [e["input"] for e in exs] == [GLUE_INSTRUCTIONS["cola"] + s + "###" for s in ("Him sleeps.", "He sleeps.")]
    assert [e["target"] for e in exs] == ["0", "1"]
    # QQP: is_duplicate; SST-2: sentence/label header.
    qqp = tmp_path / "qqp"
    qqp.mkdir()
    write_tsv(
        qqp / "dev.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], [[1, 2, 3, "q1?", "q2?", 1]]
    )
    (ex,) = load_examples(TaskConfig(task="qqp", data_dir=str(qqp)), "validation")
    assert ex["input"] == GLUE_INSTRUCTIONS["qqp"] + "q1?###q2?###" and ex["target"] == "1"
    sst = tmp_path / "sst"
    sst.mkdir()
    write_tsv(sst / "train.tsv", ["sentence", "label"], [["great movie ", 1]])
    (ex,) = load_examples(TaskConfig(task="sst2", data_dir=str(sst)), "train")
    assert ex["input"] == GLUE_INSTRUCTIONS["sst2"] + "great movie ###"


def test_qnli_field_order(tmp_path):
    write_jsonl(tmp_path / "validation.jsonl", [{"question": "Why?", "sentence": "Because.", "label": 1}])
    (ex,) = load_examples(TaskConfig(task="qnli", data_dir=str(tmp_path)), "validation")
    assert ex["input"] == GLUE_INSTRUCTIONS["qnli"] + "Why?###Because.###"


def test_mnli_validation_is_matched_then_mismatched(tmp_path):
    header = ["index", "sentence1", "sentence2", "gold_label"]
    write_tsv(tmp_path / "dev_matched.tsv", header, [[0, "p1", "h1", "neutral"]])
    write_tsv(
        tmp_path / "dev_mismatched.tsv", header, [[0, "p2", "h2", "contradiction"], [1, "p3", "h3", "entailment"]]
    )
    exs = load_examples(TaskConfig(task="mnli", data_dir=str(tmp_path)), "validation")
    assert [e["label"] for e in exs] == [1, 2, 0]
    assert exs[0]["input"] == GLUE_INSTRUCTIONS["mnli"] + "p1###h1###"
    assert "'2' if contradiction" in GLUE_INSTRUCTIONS["mnli"]


def test_stsb_target_is_rounded_score(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": v} for v in (3.75, 4.0, 2.34)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    exs = load_examples(TaskConfig(task="stsb", data_dir=str(tmp_path)), "train")
    assert [e["target"] for e in exs] == ["3.8", "4.0", "2.3"]
    assert exs[0]["label"] == 3.75


def test_unlabelled_records_are_skipped(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"sentence": "x", "label": -1}, {"sentence": "y", "label": 1}])
    with pytest.warns(UserWarning, match="unlabelled"):
        exs = load_examples(TaskConfig(task="sst2", data_dir=str(tmp_path)), "test")
    assert [e["label"] for e in exs] == [1]


def test_train_val_split_matches_hf_train_test_split():
    train, val = train_val_split(10, val_fraction=0.2, seed=123)
    # Pinned: numpy default_rng(123).permutation(10) = [7 4 0 2 1 5 6 8 3 9]; validation = its first ceil(2.0).
    assert val == [7, 4] and train == [0, 2, 1, 5, 6, 8, 3, 9]
    train, val = train_val_split(11, val_fraction=0.2, seed=321)
    assert len(val) == 3 and sorted(train + val) == list(range(11))


def test_split_schemes(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"sentence": f"s{i}", "label": i % 2} for i in range(10)])
    write_jsonl(tmp_path / "validation.jsonl", [{"sentence": "v", "label": 0}])
    tvt = TaskConfig(task="sst2", data_dir=str(tmp_path), split_scheme="train_val_split")
    train = load_examples(tvt, "train")
    val = load_examples(tvt, "validation")
    test = load_examples(tvt, "test")
    body = len(GLUE_INSTRUCTIONS["sst2"])
    assert [e["input"][body:-3] for e in val] == ["s7", "s4"]
    assert [e["input"][body:-3] for e in train] == ["s0", "s2", "s1", "s5", "s6", "s8", "s3", "s9"]
    assert [e["input"][body:-3] for e in test] == ["v"]
    official = TaskConfig(task="sst2", data_dir=str(tmp_path))
    assert len(load_examples(official, "train")) == 10
    assert len(load_examples(TaskConfig(task="sst2", data_dir=str(tmp_path), max_examples=3), "train")) == 3


def test_dart_raw_json_references(tmp_path):
    rows = [
        {
            "tripleset": [["Alan Bean", "OCCUPATION", "Test pilot"], ["Alan Bean", "BIRTH_PLACE", "Wheeler"]],
            "subtree_was_extended": False,
            "annotations": [
                {"source": "webnlg", "text": "Alan Bean was a test pilot."},
                {"source": "webnlg", "text": "Bean, born in Wheeler."},
            ],
        }
    ]
    (tmp_path / "dart-v1.1.1-full-train.json").write_text(json.dumps(rows))
    (tmp_path / "dart-v1.1.1-full-dev.json").write_text(json.dumps(rows))
    cfg = TaskConfig(task="dart", data_dir=str(tmp_path))
    train = load_examples(cfg, "train")
    expected_input = (
        "Generate text for the following RDF triples:\n"
        "Alan Bean : OCCUPATION : Test pilot | Alan Bean : BIRTH_PLACE : Wheeler###"
    )
    assert [e["input"] for e in train] == [expected_input] * 2
    assert [e["target"] for e in train] == ["Alan Bean was a test pilot.", "Bean, born in Wheeler."]
    (val,) = load_examples(cfg, "validation")
    assert val["references"] == ["Alan Bean was a test pilot.", "Bean, born in Wheeler."]
    assert val["prefix"] == "Generate text for the following RDF triples:\n"
    assert get_task("dart").add_eos and not get_task("rte").add_eos


def test_dart_hf_layout(tmp_path):
    row = {"tripleset": [["a", "b", "c"]], "annotations": {"source": ["x", "y"], "text": ["t1", "t2"]}}
    write_jsonl(tmp_path / "validation.jsonl", [row])
    (ex,) = load_examples(TaskConfig(task="dart", data_dir=str(tmp_path)), "validation")
    assert ex["references"] == ["t1", "t2"] and ex["input"].endswith("a : b : c###")


def test_samsum_json(tmp_path):
    rows = [
        {"id": "13818513", "summary": "Amanda baked cookies.", "dialogue": "Amanda: I baked cookies.\r\nJerry: Sure!"}
    ]
    (tmp_path / "val.json").write_text(json.dumps(rows))
    (ex,) = load_examples(TaskConfig(task="samsum", data_dir=str(tmp_path)), "validation")
    assert ex["input"] == "Amanda: I baked cookies.\r\nJerry: Sure!###"
    assert ex["target"] == "Amanda baked cookies." and ex["references"] == ["Amanda baked cookies."]
    assert ex["prefix"] == ""


def make_spider(root):
    tables = [
        {
            "db_id": "concert",
            "table_names_original": ["Singer", "Concert"],
            "table_names": ["singer", "concert"],
            "column_names_original": [[-1, "*"], [0, "Singer_ID"], [0, "Name"], [1, "Concert_ID"], [1, "Singer_ID"]],
            "column_names": [[-1, "*"], [0, "singer id"], [0, "name"], [1, "concert id"], [1, "singer id"]],
            "column_types": ["text", "number", "text", "number", "number"],
            "primary_keys": [1, 3],
            "foreign_keys": [[4, 1]],
        }
    ]
    (root / "tables.json").write_text(json.dumps(tables))
    q = {
        "db_id": "concert",
        "question": "How many singers?",
        "query": "SELECT count(*) FROM Singer WHERE Name = 'Ann' ",
    }
    (root / "train_spider.json").write_text(json.dumps([q] * 5))
    (root / "dev.json").write_text(json.dumps([q]))
    db_dir = root / "database" / "concert"
    db_dir.mkdir(parents=True)
    conn = sqlite3.connect(db_dir / "concert.sqlite")
    conn.execute("CREATE TABLE Singer (Singer_ID INTEGER PRIMARY KEY, Name TEXT)")
    conn.execute("CREATE TABLE Concert (Concert_ID INTEGER PRIMARY KEY, Singer_ID INTEGER)")
    conn.executemany("INSERT INTO Singer VALUES (?, ?)", [(1, "Ann"), (2, "Bob")])
    conn.commit()
    conn.close()
    return root


def test_spider_prompt_and_target(tmp_path):
    make_spider(tmp_path)
    (ex,) = load_examples(TaskConfig(task="spider", data_dir=str(tmp_path)), "validation")
    schema = (
        "singer: singer_id number ,  name text ,  foreign:  ,  primary: singer_id | "
        "concert: concert_id number ,  singer_id number ,  foreign: singer_id from singer ,  primary: concert_id"
    )
    assert ex["input"] == (
        "Create a sql request for the following question and schema:\n###"
        "Question: How many singers?\\Schema: " + schema + "\n###"
    )
    assert "\\Schema" in ex["input"]
    assert ex["target"] == "select count(*) from singer where name = 'ann'"
    assert ex["gold_sql"] == "SELECT count(*) FROM Singer WHERE Name = 'Ann' "
    assert ex["db_id"] == "concert" and ex["db_path"].endswith("database/concert/concert.sqlite")
    tvt = TaskConfig(task="spider", data_dir=str(tmp_path), split_scheme="train_val_split")
    assert (
        len(load_examples(tvt, "train")),
        len(load_examples(tvt, "validation")),
        len(load_examples(tvt, "test")),
    ) == (
        4,
        1,
        1,
    )


def test_spider_needs_tables(tmp_path):
    (tmp_path / "dev.json").write_text(json.dumps([{"db_id": "x", "question": "q", "query": "select 1"}]))
    with pytest.raises(FileNotFoundError, match="tables.json"):
        load_examples(TaskConfig(task="spider", data_dir=str(tmp_path)), "validation")


def test_jsonl_user_dataset(tmp_path):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "capital of France?", "answer": ["Paris", "paris"]}]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    cfg = TaskConfig(
        task="jsonl",
        data_files={"train": str(path), "validation": str(path)},
        input_field="question",
        target_field="answer",
        instruction="Answer: ",
    )
    train = load_examples(cfg, "train")
    assert [(e["input"], e["target"]) for e in train] == [
        ("Answer: 2+2?###", "4"),
        ("Answer: capital of France?###", "Paris"),
        ("Answer: capital of France?###", "paris"),
    ]
    val = load_examples(cfg, "validation")
    assert [e["references"] for e in val] == [["4"], ["Paris", "paris"]]


def test_csv_and_parquet_sources(tmp_path):
    (tmp_path / "train.csv").write_text('input,target\n"a, b",c\n', encoding="utf-8")
    (ex,) = load_examples(TaskConfig(task="jsonl", data_dir=str(tmp_path)), "train")
    assert ex["input"] == "a, b###" and ex["target"] == "c"
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"input": ["x"], "target": ["y"]}), tmp_path / "test.parquet")
    (ex,) = load_examples(TaskConfig(task="jsonl", data_dir=str(tmp_path)), "test")
    assert ex["target"] == "y"


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no dataset file .*train.jsonl"):
        load_examples(TaskConfig(task="rte", data_dir=str(tmp_path)), "train")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(TaskConfig(task="rte", data_files={"train": str(tmp_path / "missing.jsonl")}), "train")
    write_jsonl(tmp_path / "train.jsonl", [{"sentence1": "a", "label": 0}])
    with pytest.raises(ValueError, match=r"no field 'sentence2'.*\['label', 'sentence1'\]"):
        load_examples(TaskConfig(task="rte", data_dir=str(tmp_path)), "train")
    with pytest.raises(ValueError, match="no field 'target'"):
        load_examples(TaskConfig(task="jsonl", data_dir=str(tmp_path), input_field="sentence1"), "train")
    with pytest.raises(ValueError, match="split must be"):
        load_examples(TaskConfig(task="rte", data_dir=str(tmp_path)), "dev")
    with pytest.raises(ValueError, match="split_scheme"):
        TaskConfig(task="rte", split_scheme="random")
    write_jsonl(tmp_path / "validation.jsonl", [{"sentence1": "a", "sentence2": "b", "label": "maybe"}])
    with pytest.raises(ValueError, match="'maybe'"):
        load_examples(TaskConfig(task="rte", data_dir=str(tmp_path)), "validation")


def test_hub_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="data_dir"):
            load_examples(TaskConfig(task="rte"), "train")
    else:
        pytest.skip("datasets is installed; the hub path needs a network")


def test_hub_source_goes_through_datasets(monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [{"premise": split, "hypothesis": "h", "label": 2}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    exs = load_examples(TaskConfig(task="mnli"), "validation")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched"), ("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert [e["input"] for e in exs] == [
        GLUE_INSTRUCTIONS["mnli"] + "validation_matched###h###",
        GLUE_INSTRUCTIONS["mnli"] + "validation_mismatched###h###",
    ]


@pytest.mark.parametrize("target", [None, 5, ["ok", None], {"text": "x"}])
def test_jsonl_target_that_is_not_a_string_is_refused_with_file_and_line(tmp_path, target):
    path = tmp_path / "train.jsonl"
    rows = [{"input": "a", "target": "fine"}, {"input": "b", "target": target}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")  # a blank line: the record is on line 3
    with pytest.raises(ValueError, match=rf"field 'target' holds .*, not a string .*\({re.escape(str(path))} line 3\)"):
        load_examples(TaskConfig(task="jsonl", data_dir=str(tmp_path)), "train")
