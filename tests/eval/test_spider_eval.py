import sqlite3

import pytest

from ssmtune.eval.spider import SqlTimeout, exact_set_match, execute_sql, execution_match, spider_scores


@pytest.fixture
def db_dir(tmp_path):
    root = tmp_path / "database"
    (root / "concert").mkdir(parents=True)
    conn = sqlite3.connect(root / "concert" / "concert.sqlite")
    conn.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
    conn.execute("CREATE TABLE concert (concert_id INTEGER PRIMARY KEY, singer_id INTEGER, year INTEGER)")
    conn.executemany("INSERT INTO singer VALUES (?, ?, ?)", [(1, "Ann", 30), (2, "Bob", 25), (3, "Cy", 30)])
    conn.executemany("INSERT INTO concert VALUES (?, ?, ?)", [(1, 1, 2014), (2, 1, 2015), (3, 2, 2014)])
    conn.commit()
    conn.close()
    return root


def test_execute_and_match(db_dir):
    db = db_dir / "concert" / "concert.sqlite"
    assert execute_sql(db, "SELECT count(*) FROM singer") == [(3,)]
    # Same multiset in another order matches when the gold has no ORDER BY.
    assert execution_match(db, "SELECT name FROM singer ORDER BY name DESC", "SELECT name FROM singer")
    # With ORDER BY in the gold the order matters.
    assert not execution_match(db, "SELECT name FROM singer ORDER BY age", "SELECT name FROM singer ORDER BY name")
    assert execution_match(db, "select name from singer order by name asc", "SELECT name FROM singer ORDER BY name")
    # Multisets, not sets: duplicates count.
    assert not execution_match(db, "SELECT DISTINCT age FROM singer", "SELECT age FROM singer")
    assert not execution_match(db, "SELECT nme FROM singer", "SELECT name FROM singer")
    assert not execution_match(
        db, "SELECT name FROM singer WHERE name = 'ann'", "SELECT name FROM singer WHERE name = 'Ann'"
    )
    # The database is opened read-only.
    assert not execution_match(db, "DELETE FROM singer", "SELECT name FROM singer WHERE 0")
    assert execute_sql(db, "SELECT count(*) FROM singer") == [(3,)]


def test_timeout(db_dir):
    db = db_dir / "concert" / "concert.sqlite"
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    with pytest.raises(SqlTimeout):
        execute_sql(db, endless, timeout=0.2)
    assert not execution_match(db, endless, "SELECT 1", timeout=0.2)


def test_spider_scores(db_dir):
    preds = [
        "SELECT T1.name FROM singer AS T1 JOIN concert AS T2 ON T1.singer_id = T2.singer_id WHERE T2.year = 2014",
        "select count(*) from singer where age > 26",
        "select name from singer",
        "select name from nowhere",
    ]
    golds = [
        "SELECT name FROM concert AS a JOIN singer AS b ON b.singer_id = a.singer_id WHERE year = 2014",
        "SELECT count(*) FROM singer WHERE age > 28",
        "SELECT age FROM singer",
        "SELECT bad FROM nowhere",
    ]
    s = spider_scores(preds, golds, ["concert"] * 4, db_dir)
    # exec: 1 and 2 return the same rows; 3 differs; 4's gold fails.
    assert s["execution_accuracy"] == pytest.approx(50.0)
    # exact-set match ignores values (1 and 2 match), not the selected column (3).
    assert s["exact_set_match"] == pytest.approx(50.0)
    assert s["gold_errors"] == 1 and s["num_examples"] == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        spider_scores(preds[:1], golds[:1], ["concert"], db_dir / "missing")
    with pytest.raises(ValueError, match="differ in length"):
        spider_scores(preds, golds[:2], ["concert"] * 4, db_dir)


@pytest.mark.parametrize(
    "pred, gold, same",
    [
        ("SELECT name, age FROM singer", "select age , name from singer;", True),
        (
            "SELECT count(T1.*) FROM t AS T1 ORDER BY a DESC LIMIT 3",
            "select count(*) from t order by a desc limit 3",
            True,
        ),
        ("select a from t order by a desc", "select a from t order by a asc", False),
        ("select a from t where x = 1 and y = 'q'", 'select a from t where y = "r" and x = 3', True),
        ("select a from t where x = 1 or y = 2", "select a from t where x = 1 and y = 2", False),
        ("select a from t where x in (select T9.b from u as T9)", "SELECT a FROM t WHERE x IN (SELECT b FROM u)", True),
        (
            "select a from t where x in (select b from u)",
            "select a from t where x in (select b from u where c = 1)",
            False,
        ),
        ("select a from t intersect select a from u", "select a from t", False),
        ("select distinct a from t", "select a from t", False),
        ("select a from t group by a having count(*) > 1", "select a from t group by a", False),
        ("select (", "select a from t", False),
    ],
)
def test_exact_set_match(pred, gold, same):
    assert exact_set_match(pred, gold) is same
