import gzip
import json

import pyarrow
import pyarrow.csv
import pyarrow.parquet
import pytest

from data.loading import DataError, read_bytes, read_rows

ROWS = [{"prompt": "Who had the kite?", "completion": "Mia."}, {"prompt": "What colour?", "completion": "Red."}]


def test_every_local_format_reads_the_same_rows(tmp_path):
    jsonl = "".join(json.dumps(row) + "\n" for row in ROWS)
    (tmp_path / "a.jsonl").write_text(jsonl)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    table = pyarrow.Table.from_pylist(ROWS)
    pyarrow.parquet.write_table(table, tmp_path / "a.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "a.csv")
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "a.parquet", "a.csv"):
        assert read_rows(tmp_path / name) == ROWS, name


def test_damaged_files_are_data_errors_not_tracebacks(tmp_path):
    whole = gzip.compress(b'{"text": "a"}\n' * 100)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "a"}\n')
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "empty.csv").write_text("")
    for name, message in (("cut.jsonl.gz", "damaged or truncated gzip"), ("plain.jsonl.gz", "damaged or truncated gzip"),
                          ("bad.parquet", "not a readable parquet file"), ("empty.csv", "not a readable csv file")):
        with pytest.raises(DataError, match=message):
            read_rows(tmp_path / name)
    with pytest.raises(DataError, match="cannot be read"):
        read_bytes(tmp_path)  # a directory where a file should be


def test_max_rows_reads_only_the_first_rows_and_keeps_the_eval_split_whole(tmp_path):
    from data.loading import load_source
    from pipeline.config.schema import DatasetSource

    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    evaluation.write_text("".join(json.dumps({"text": f"held {i}"}) + "\n" for i in range(4)))
    rows, held = load_source(DatasetSource(str(train), eval_split=str(evaluation), max_rows=3), "data.pretrain", 0)
    assert [r["text"] for r in rows] == ["row 0", "row 1", "row 2"] and len(held) == 4
