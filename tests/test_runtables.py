"""Typed reads of a run's CSV tables: labels are strings (a class named NA or null), damaged cells named."""
from __future__ import annotations

import pytest

from oncotransfer.errors import CheckpointError
from oncotransfer.runtables import check_split, read_predictions

HEAD = "fold,path,label,pred,prob_NA,prob_null,cal_prob_NA,cal_prob_null,ood_score,in_distribution\n"
ROWS = ["0,x/1.png,NA,NA,0.9,0.1,0.8,0.2,0.5,True", "1,x/2.png,null,null,0.2,0.8,,,0.7,"]


def write(tmp_path, rows, head=HEAD):
    (tmp_path / "predictions.csv").write_text(head + "\n".join(rows) + "\n")
    return tmp_path / "predictions.csv"


def test_labels_na_and_null_are_classes_not_missing_values(tmp_path):
    """The run trained to the end, then died re-reading its own predictions: labels ['nan'] not among the classes."""
    df = read_predictions(write(tmp_path, ROWS), ["NA", "null"])
    assert df["label"].tolist() == ["NA", "null"] and df["pred"].tolist() == ["NA", "null"]
    assert df["prob_NA"].tolist() == [0.9, 0.2] and df["fold"].tolist() == [0, 1]
    assert df["cal_prob_NA"].isna().tolist() == [False, True]
    assert df["in_distribution"].tolist()[0] is True


@pytest.mark.parametrize("row,column", [("0,x/1.png,NA,NA,abc,0.1,,,,", "prob_NA"),
                                        ("0,x/1.png,NA,NA,nan,0.1,,,,", "prob_NA"),
                                        ("0,x/1.png,NA,NA,1.5,0.1,,,,", "prob_NA"),
                                        ("x,x/1.png,NA,NA,0.5,0.5,,,,", "fold"),
                                        ("0,x/1.png,zebra,NA,0.5,0.5,,,,", "label"),
                                        ("0,x/1.png,,NA,0.5,0.5,,,,", "label"),
                                        ("0,x/1.png,NA,zebra,0.5,0.5,,,,", "pred"),
                                        ("0,x/1.png,NA,NA,0.5,0.5,,,oops,", "ood_score")])
def test_a_garbage_cell_is_named_by_row_and_column(tmp_path, row, column):
    with pytest.raises(CheckpointError, match=rf"predictions\.csv: row 3, column {column}: .*retrain"):
        read_predictions(write(tmp_path, [ROWS[0], row]), ["NA", "null"])


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage \xfe" * 20, b"a,b\n1,2,3,4\n"])
def test_a_file_that_is_not_a_table_is_named(tmp_path, content):
    (tmp_path / "predictions.csv").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"predictions\.csv: (not a readable CSV|no column)"):
        read_predictions(tmp_path / "predictions.csv", ["NA", "null"])


SPLIT = "path,label,patient,fold,subset,index,sha256,phash\n"
GOOD = "a/1.png,a,,0,train,0," + "ab" * 32 + ",c425b39be1f4c925"


def test_split_hashes_are_checked_and_a_missing_split_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"split\.csv: missing, so --data cannot be checked for overlap"):
        check_split(tmp_path)
    (tmp_path / "split.csv").write_text(SPLIT + GOOD + "\n")
    assert check_split(tmp_path)["sha256"].tolist() == ["ab" * 32]
    (tmp_path / "split.csv").write_text(SPLIT + GOOD + "\n" + GOOD.replace("ab" * 32, "not-a-hash") + "\n")
    with pytest.raises(CheckpointError, match=r"split\.csv: row 3, column sha256: 'not-a-hash' is not a sha256"):
        check_split(tmp_path)
    (tmp_path / "split.csv").write_text(SPLIT + GOOD.replace("c425b39be1f4c925", "zz") + "\n")
    with pytest.raises(CheckpointError, match=r"column phash"):
        check_split(tmp_path)


def test_export_names_a_split_csv_of_garbage_bytes(tmp_path):
    """The parity images come from split.csv: non-UTF-8 bytes there are a damaged run, named in one line."""
    from oncotransfer.infer.export import parity_images
    (tmp_path / "split.csv").write_bytes(b"\xff\xfe\x00garbage\x81\n" * 10)
    with pytest.raises(CheckpointError, match=r"split\.csv: .*copy the whole run directory again"):
        parity_images(tmp_path, {"config": {"data": {"path": str(tmp_path)}}}, 32)
