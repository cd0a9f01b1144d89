"""Spider text-to-SQL scores: execution accuracy on sqlite and a simplified exact-set match.

Both only APPROXIMATE the official evaluator. The reference for published numbers is the official evaluator,
test-suite-sql-eval (taoyds/test-suite-sql-eval, successor of taoyds/spider `evaluation.py`): use it for any number
compared with papers, and these functions for fast in-training monitoring.

- Execution accuracy runs the gold and predicted SQL on `database/<db_id>/<db_id>.sqlite` (read-only, with a
  timeout) and compares the results as multisets of rows, or as ordered lists when the gold query has ORDER BY.
  Unlike test-suite-sql-eval it uses one database, does not try column permutations, and compares values exactly.
- Exact-set match (`exact_set_match`) approximates the official "exact match without values": both queries are
  normalised (lowercase, whitespace, quotes, literal values -> "value", `AS` aliases resolved to table names,
  `t.col` -> `col`), split into clauses (select, from, where, group by, having, order by, limit, and the
  intersect/union/except sub-queries) and compared clause by clause as sets of items. It has no schema, so it
  cannot resolve `*` or unqualified columns the way the official parser does, and it does not grade hardness.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path


class SqlTimeout(Exception):
    pass


def execute_sql(db_path: str | Path, sql: str, *, timeout: float = 30.0) -> list[tuple]:
    """All rows of `sql` on a sqlite file opened read-only; raises `SqlTimeout` after `timeout` seconds."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"sqlite database {str(db_path)!r} does not exist")
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=timeout)
    # Spider's databases hold some non-UTF-8 text; keep such bytes instead of failing the query.
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    deadline = time.monotonic() + timeout
    # sqlite calls this every 10k VM steps; a non-zero return interrupts the query.
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e):
            raise SqlTimeout(f"query exceeded {timeout} s: {sql!r}") from e
        raise
    finally:
        conn.close()


def _has_order_by(sql: str) -> bool:
    return re.search(r"\border\s+by\b", sql, flags=re.IGNORECASE) is not None


def results_match(gold_rows: list[tuple], pred_rows: list[tuple], *, ordered: bool) -> bool:
    if ordered:
        return gold_rows == pred_rows
    return Counter(gold_rows) == Counter(pred_rows)


def execution_match(db_path: str | Path, pred_sql: str, gold_sql: str, *, timeout: float = 30.0) -> bool:
    """Whether the prediction returns the gold query's result (any prediction error or timeout is a miss)."""
    gold_rows = execute_sql(db_path, gold_sql, timeout=timeout)
    try:
        pred_rows = execute_sql(db_path, pred_sql, timeout=timeout)
    except (sqlite3.Error, SqlTimeout, ValueError):
        return False
    return results_match(gold_rows, pred_rows, ordered=_has_order_by(gold_sql))


_CLAUSES = ("select", "from", "where", "group by", "having", "order by", "limit")
_SET_OPS = ("intersect", "union", "except")
_TOKEN = re.compile(r"'[^']*'|\"[^\"]*\"|\d+(?:\.\d+)?|[a-z_][a-z0-9_.]*|!=|>=|<=|<>|[(),*=<>+\-/;]")


def _tokens(sql: str) -> list[str]:
    toks = _TOKEN.findall(sql.strip().lower())
    out = []
    for t in toks:
        if t[0] in "'\"" or t[0].isdigit():
            out.append("value")
        elif t == ";":
            continue
        else:
            out.append(t)
    return out


def _resolve_aliases(toks: list[str]) -> list[str]:
    """Drop `AS alias` declarations (and bare `table alias` in FROM) and strip `alias.` / `table.` qualifiers."""
    out: list[str] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "as" and i + 1 < len(toks):
            i += 2
            continue
        out.append(t)
        i += 1
    stripped = [t.split(".", 1)[1] if "." in t else t for t in out]
    # "t1.*" tokenises as "t1." then "*": drop the empty remainder.
    return [t for t in stripped if t]


def _split_top(toks: list[str], words: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """Split a token list at top-level (depth 0) keywords, multi-word keywords included."""
    parts: list[tuple[str, list[str]]] = [("", [])]
    depth, i = 0, 0
    while i < len(toks):
        t = toks[i]
        depth += (t == "(") - (t == ")")
        two = " ".join(toks[i : i + 2])
        if depth == 0 and two in words:
            parts.append((two, []))
            i += 2
            continue
        if depth == 0 and t in words:
            parts.append((t, []))
            i += 1
            continue
        parts[-1][1].append(t)
        i += 1
    return parts


def _item(toks: list[str]) -> tuple:
    """One item as a token tuple; each parenthesised sub-query becomes its normalised form."""
    out: list = []
    i = 0
    while i < len(toks):
        if toks[i] == "(" and i + 1 < len(toks) and toks[i + 1] == "select":
            depth, j = 0, i
            for j in range(i, len(toks)):
                depth += (toks[j] == "(") - (toks[j] == ")")
                if depth == 0:
                    break
            out.append(_normalise(toks[i + 1 : j]))
            i = j + 1
        else:
            out.append(toks[i])
            i += 1
    return tuple(out)


def _items(toks: list[str], seps: tuple[str, ...]) -> frozenset:
    """The set of top-level items separated by `seps`."""
    return frozenset(_item(seg) for _, seg in _split_top(toks, seps) if seg)


def _symmetric(item: tuple) -> tuple:
    """`a = b` and `b = a` as one form (join conditions)."""
    if item.count("=") == 1:
        k = item.index("=")
        return ("=", frozenset((item[:k], item[k + 1 :])))
    return item


def _normalise(toks: list[str]) -> tuple:
    parts = _split_top(toks, _SET_OPS)
    clauses: dict[str, object] = {}
    for name, body in _split_top(parts[0][1], _CLAUSES)[1:]:
        if name == "select":
            distinct = bool(body) and body[0] == "distinct"
            clauses[name] = (distinct, _items(body[int(distinct) :], (",",)))
        elif name == "from":
            # Tables and join conditions, each as a set; join flavours carry no information here.
            body = [t for t in body if t not in ("inner", "left", "outer", "cross", "natural")]
            tables, conds = set(), set()
            for kw, seg in _split_top(body, ("join", ",", "on", "and")):
                if kw in ("on", "and"):
                    conds.add(_symmetric(_item(seg)))
                elif seg:
                    tables.add(_item(seg))
            clauses[name] = (frozenset(tables), frozenset(conds))
        elif name in ("where", "having"):
            connectors = tuple(sorted(kw for kw, _ in _split_top(body, ("and", "or"))[1:]))
            clauses[name] = (_items(body, ("and", "or")), connectors)
        elif name in ("group by", "order by"):
            clauses[name] = _items(body, (",",))
        else:
            clauses[name] = tuple(body)
    subs = tuple((op, _normalise(body)) for op, body in parts[1:])
    return frozenset(clauses.items()), subs


def normalise_sql(sql: str):
    """A hashable clause-set form of a query; equal forms mean an exact-set match (see the module docstring)."""
    return _normalise(_resolve_aliases(_tokens(sql)))


def exact_set_match(pred_sql: str, gold_sql: str) -> bool:
    try:
        return normalise_sql(pred_sql) == normalise_sql(gold_sql)
    except (IndexError, ValueError):
        return False


def spider_scores(
    preds: Sequence[str],
    golds: Sequence[str],
    db_ids: Sequence[str],
    db_dir: str | Path,
    *,
    timeout: float = 30.0,
) -> dict[str, float | int]:
    """Execution accuracy and simplified exact-set match, x 100, over a list of predictions.

    Args:
        preds: predicted SQL strings.
        golds: gold SQL as released (not lowercased: lowercasing changes string literals).
        db_ids: the database of each example.
        db_dir: Spider's `database/` folder (holding `<db_id>/<db_id>.sqlite`).
        timeout: seconds allowed per query.

    A gold query that fails to run counts as a miss and is reported in `gold_errors`.
    """
    if not (len(preds) == len(golds) == len(db_ids)):
        raise ValueError(f"preds, golds and db_ids differ in length: {len(preds)}, {len(golds)}, {len(db_ids)}")
    db_dir = Path(db_dir)
    if not db_dir.is_dir():
        raise FileNotFoundError(f"Spider database folder {str(db_dir)!r} does not exist")
    exec_hits = exact_hits = gold_errors = 0
    for pred, gold, db_id in zip(preds, golds, db_ids):
        db_path = db_dir / db_id / f"{db_id}.sqlite"
        try:
            exec_hits += execution_match(db_path, pred, gold, timeout=timeout)
        except (sqlite3.Error, SqlTimeout):
            gold_errors += 1
        exact_hits += exact_set_match(pred, gold)
    n = max(len(preds), 1)
    return {
        "execution_accuracy": 100.0 * exec_hits / n,
        "exact_set_match": 100.0 * exact_hits / n,
        "gold_errors": gold_errors,
        "num_examples": len(preds),
    }
