"""JSONL loading: every kind of bad data file fails at load time with a message naming the
file, the 1-based line and the field. Also the GSM8K / MATH-500 split and config errors."""

import json
import re

import pytest

from reclight.tasks import GSM8K, DataError, Math500, read_jsonl
from reclight.tasks.jsonl import check_split_indices, held_out_indices

FIELDS = {"question": str, "answer": str}


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good(q="What is 2+2?", a="2+2=4\n#### 4"):
    return json.dumps({"question": q, "answer": a})


def test_reads_rows_skipping_blank_lines_with_true_line_numbers(tmp_path):
    """Lines 1, 3 and 5 hold records, 2 and 4 are blank / whitespace: three rows whose
    ``line`` is the file's 1-based line number, not the row index."""
    f = write(tmp_path / "d.jsonl", [good(q="a"), "", good(q="b"), "   \t", good(q="c")])
    rows = read_jsonl(f, FIELDS)
    assert [r.line for r in rows] == [1, 3, 5]
    assert [r.record["question"] for r in rows] == ["a", "b", "c"]


def test_missing_file_names_path_and_config_field(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(FileNotFoundError) as e:
        read_jsonl(missing, FIELDS, config_field="data_dir / train_file")
    assert str(missing) in str(e.value) and "'data_dir / train_file'" in str(e.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_jsonl(tmp_path, FIELDS)


def test_malformed_json_reports_file_line_and_snippet(tmp_path):
    """The bad record is on line 3 (line 2 is blank and still counted)."""
    f = write(tmp_path / "d.jsonl", [good(), "", '{"question": "x", "answer": '])
    with pytest.raises(DataError) as e:
        read_jsonl(f, FIELDS)
    msg = str(e.value)
    assert f"{f}:3: malformed JSON" in msg and '\'{"question": "x", "answer":\'' in msg


def test_long_bad_line_snippet_is_truncated(tmp_path):
    f = write(tmp_path / "d.jsonl", ["x" * 500])
    with pytest.raises(DataError) as e:
        read_jsonl(f, FIELDS)
    assert "'" + "x" * 80 + "...'" in str(e.value) and "x" * 81 not in str(e.value)


def test_line_that_is_not_an_object(tmp_path):
    f = write(tmp_path / "d.jsonl", [good(), '["question", "answer"]'])
    with pytest.raises(DataError, match=re.escape(f"{f}:2: expected a JSON object")) as e:
        read_jsonl(f, FIELDS)
    assert "got list" in str(e.value)


def test_missing_field_names_field_line_and_present_fields(tmp_path):
    f = write(tmp_path / "d.jsonl", [good(), json.dumps({"question": "q", "solution": "s"})])
    with pytest.raises(DataError) as e:
        read_jsonl(f, FIELDS)
    assert str(e.value) == (
        f"{f}:2: missing required field 'answer'; fields present: ['question', 'solution']"
    )


def test_wrong_field_type(tmp_path):
    f = write(tmp_path / "d.jsonl", [json.dumps({"question": "q", "answer": 4})])
    with pytest.raises(DataError, match=re.escape(f"{f}:1: field 'answer' must be str, got int 4")):
        read_jsonl(f, FIELDS)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_or_blank_file_is_an_empty_data_set(tmp_path, content):
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(DataError, match=re.escape(f"empty data set: {f} has no examples")):
        read_jsonl(f, FIELDS)


def test_gsm8k_answer_without_final_number_is_rejected_at_load(tmp_path):
    write(tmp_path / "test.jsonl", [good(), good(a="it is four")])
    task = GSM8K(data_dir=str(tmp_path))
    with pytest.raises(DataError, match=re.escape("test.jsonl:2: field 'answer' must end with")):
        task.examples("test")


def test_gsm8k_missing_data_dir_names_the_setting(tmp_path):
    task = GSM8K(data_dir=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=re.escape("'data_dir / train_file'")):
        task.examples("train")


def test_gsm8k_splits_are_deterministic_disjoint_and_cover_the_train_file(tmp_path):
    """10 train rows, val_size=3 (check_size=None: 3 too): val has 3, check 3, train 4, no
    overlap, union = all 10 lines; the val lines are those of ``held_out_indices(10, 3, seed)``
    (0-based index + 1), the check lines those of ``check_split_indices(10, val, 3, seed)``."""
    write(tmp_path / "train.jsonl", [good(q=f"q{i}", a=f"#### {i}") for i in range(10)])
    task = GSM8K(data_dir=str(tmp_path), val_size=3, seed=7)
    train, val, check = task.examples("train"), task.examples("val"), task.examples("check")
    lines = lambda xs: {int(e.uid.rsplit(":", 1)[1]) for e in xs}  # noqa: E731
    assert len(val) == 3 and len(check) == 3 and len(train) == 4
    assert lines(val) == {i + 1 for i in held_out_indices(10, 3, 7)}
    assert lines(check) == {i + 1 for i in check_split_indices(10, held_out_indices(10, 3, 7), 3, 7)}
    assert lines(train) | lines(val) | lines(check) == set(range(1, 11))
    assert not (lines(train) & lines(val) or lines(train) & lines(check) or lines(val) & lines(check))
    assert len(GSM8K(data_dir=str(tmp_path), val_size=3, check_size=5, seed=7).examples("train")) == 2
    again = GSM8K(data_dir=str(tmp_path), val_size=3, seed=7)
    assert again.examples("val") == val
    assert GSM8K(data_dir=str(tmp_path), val_size=3, seed=8).examples("val") != val
    assert val[0].uid.startswith("gsm8k/train.jsonl:")
    assert val[0].prompt.startswith(f"q{int(val[0].answer)}\n")


def test_gsm8k_val_size_too_large_or_zero(tmp_path):
    write(tmp_path / "train.jsonl", [good(), good(q="What is 3+3?", a="#### 6")])
    with pytest.raises(DataError, match=r"val_size=1 \+ check_size=1 hold out all 2 examples"):
        GSM8K(data_dir=str(tmp_path), val_size=1).examples("train")
    with pytest.raises(DataError, match=r"empty data set: .* after taking the check split \(check_size=0\)"):
        GSM8K(data_dir=str(tmp_path), val_size=0).examples("check")  # check_size=None: val_size
    with pytest.raises(DataError, match=r"empty data set: .* after taking the val split"):
        GSM8K(data_dir=str(tmp_path), val_size=0).examples("val")


def test_empty_text_field_is_refused_naming_file_and_line(tmp_path):
    """Before: an empty question was accepted and trained on (the prompt was the template alone)."""
    f = write(tmp_path / "d.jsonl", [good(), good(q=" \n ")])
    with pytest.raises(DataError) as e:
        read_jsonl(f, FIELDS)
    assert str(e.value).startswith(f"{f}:2: field 'question'=' \\n ' is not valid; accepted: a non-empty text")
    write(tmp_path / "test.jsonl", [json.dumps({"problem": "p", "answer": ""})])
    with pytest.raises(DataError, match=r"test.jsonl:1: field 'answer'='' is not valid"):
        Math500(data_dir=str(tmp_path)).examples("test")


def test_duplicate_rows_are_dropped_before_the_split_with_a_count(tmp_path):
    """Rows 6-9 repeat rows 1-4 (row 9's answer differs): they are dropped, the first kept, with
    one warning counting them; train and val then share no question, whatever the seed (before:
    a repeated row could be held out on one side and trained on from the other)."""
    rows = [good(q=f"q{i}", a=f"#### {i}") for i in range(5)]
    rows += rows[:3] + [good(q="q3", a="#### 99")]
    write(tmp_path / "train.jsonl", rows)
    for seed in range(8):
        task = GSM8K(data_dir=str(tmp_path), val_size=2, check_size=1, seed=seed)
        with pytest.warns(UserWarning) as caught:
            train, val, check = task.examples("train"), task.examples("val"), task.examples("check")
        prompts = [{e.prompt for e in xs} for xs in (train, val, check)]
        assert len(train) + len(val) + len(check) == 5 and len(set().union(*prompts)) == 5
    msg = str(caught[0].message)
    assert msg == (f"{tmp_path / 'train.jsonl'}: dropped 4 of 9 rows whose 'question' repeats an earlier row's (line "
                   "(= first line): 6 (= 1), 7 (= 2), 8 (= 3), 9 (= 4)); 1 of them differ in other fields (e.g. the "
                   "answer): the first row's are used; each prompt is kept once, so held-out prompts are never also "
                   "trained on")
    assert {e.answer for e in train + val + check} == {"0", "1", "2", "3", "4"}  # q3 keeps its first answer
    write(tmp_path / "test.jsonl", [json.dumps({"problem": p, "answer": "1"}) for p in ("a", "b", "a")])
    with pytest.warns(UserWarning, match=r"test.jsonl: dropped 1 of 3 rows whose 'problem' repeats"):
        assert len(Math500(data_dir=str(tmp_path)).examples("test")) == 2


def test_gsm8k_bad_arguments_and_split():
    with pytest.raises(ValueError, match=r"GSM8K.prompt_template='Q: \{problem\}' is not valid; accepted: a template that contains '\{question\}'"):
        GSM8K(prompt_template="Q: {problem}")
    with pytest.raises(ValueError, match=r"GSM8K.max_examples=0 is not valid; accepted: None or an integer >= 1"):
        GSM8K(max_examples=0)
    with pytest.raises(ValueError, match=r"GSM8K.val_size=-1 is not valid; accepted: an integer >= 0"):
        GSM8K(val_size=-1)
    with pytest.raises(ValueError, match=r"Math500.val_size=0 is not valid; accepted: an integer >= 1"):
        Math500(val_size=0)
    with pytest.raises(ValueError, match=r"Math500.prompt_template='x' is not valid; accepted: a template that contains '\{problem\}'"):
        Math500(prompt_template="x")
    accepted = "split='dev' is not available; accepted: train, check, val, test"
    with pytest.raises(ValueError, match=accepted):
        GSM8K().examples("dev")


def test_math500_filter_leaving_nothing_is_an_empty_data_set(tmp_path):
    rows = [{"problem": "p", "answer": "1", "subject": "Algebra", "level": 3}]
    write(tmp_path / "test.jsonl", [json.dumps(r) for r in rows])
    task = Math500(data_dir=str(tmp_path), subject="Geometry")
    with pytest.raises(DataError, match="empty data set: .* after filtering subject='Geometry'"):
        task.examples("test")
    assert len(Math500(data_dir=str(tmp_path), subject="algebra").examples("test")) == 1
    with pytest.raises(DataError, match="empty data set"):
        Math500(data_dir=str(tmp_path), max_level=2).examples("test")


def test_math500_train_split_needs_train_file(tmp_path):
    for split in ("train", "check"):
        with pytest.raises(ValueError, match=f"split='{split}' is not available: MATH-500 is a test set"):
            Math500(data_dir=str(tmp_path)).examples(split)
    write(tmp_path / "test.jsonl", [json.dumps({"problem": "t", "answer": "1"})])
    write(tmp_path / "tr.jsonl", [json.dumps({"problem": p, "answer": "2"}) for p in ("p", "q")])
    task = Math500(data_dir=str(tmp_path), train_file="tr.jsonl", check_size=1)
    (ex,), (held,) = task.examples("train"), task.examples("check")
    assert ex.answer == "2" and {ex.uid, held.uid} == {"math500/tr.jsonl:1", "math500/tr.jsonl:2"}
    with pytest.raises(DataError, match=r"Math500: check_size=100 is not valid for .*tr.jsonl; accepted: at most 1 "
                                        r"\(its 2 problems, less 0 also in the test file, less one"):
        Math500(data_dir=str(tmp_path), train_file="tr.jsonl").examples("train")  # check_size=None: val_size=100


def test_hf_loading_without_datasets_package_says_what_to_do(monkeypatch):
    """``data_dir=None`` means "load by name"; without ``datasets`` the error names both fixes."""
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"needs the `datasets` package.*or set data_dir"):
        GSM8K().examples("test")


# -- encodings (issue #17, item 5: before, a bare UnicodeDecodeError naming neither file nor line) --
def test_utf16_file_names_the_file_and_the_encoding(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(good() + "\n" + good() + "\n", encoding="utf-16")
    with pytest.raises(DataError) as e:
        read_jsonl(f, FIELDS)
    assert str(e.value) == (f"{f}:1: the file is UTF-16 (little-endian) (it starts with the byte-order mark "
                            "b'\\xff\\xfe'); accepted: UTF-8 JSON Lines (convert it, e.g. `iconv -f UTF-16 -t UTF-8`)")
    f.write_bytes((good() + "\n").encode("utf-16-be"))  # no byte-order mark: NUL bytes between characters
    with pytest.raises(DataError, match=re.escape(f"{f}:1: the line holds NUL bytes (column 1): the file looks "
                                                  "UTF-16 or binary")):
        read_jsonl(f, FIELDS)


def test_latin1_byte_names_line_column_and_snippet(tmp_path):
    f = tmp_path / "d.jsonl"
    bad = json.dumps({"question": "caf\u00e9 au lait?", "answer": "#### 4"}, ensure_ascii=False)
    f.write_bytes((good() + "\n\n" + bad + "\n").encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_jsonl(f, FIELDS)
    assert str(e.value).startswith(f"{f}:3: not valid UTF-8 (byte b'\\xe9' at column 18: invalid continuation byte) "
                                   "near '{\"question\": \"caf\ufffd au lait?'; accepted: UTF-8 JSON Lines")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    f = tmp_path / "d.jsonl"
    row = json.dumps({"question": "\u00e9t\u00e9", "answer": "#### 4"}, ensure_ascii=False)
    f.write_bytes(b"\xef\xbb\xbf" + (row + "\n" + good() + "\n").encode())
    assert [r.record["question"] for r in read_jsonl(f, FIELDS)] == ["\u00e9t\u00e9", "What is 2+2?"]
