"""Task sources: JSON/JSONL files, the hf: spec without `datasets`, and the synthetic families."""

import json
import re
import string
import sys
from collections import Counter

import pytest

from dnd_scale.synthetic import SYNTHETIC_FAMILIES, TRUE_FALSE_OPTIONS, generate_records
from dnd_scale.tasks import TaskRecord, infer_options, load_task, load_tasks

ARC_SYSTEM = "you are a helpful AI assistant, and you are going to answer the question of the user"
MC_PROMPT = "Which skin surface will produce the most heat?\nA: dry palms\nB: wet palms\nC: oily palms\nD: lotion"


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def test_json_file_of_dnd_records(tmp_path):
    path = write_json(tmp_path / "ARC-c_train.json", [
        {"prompt": MC_PROMPT, "response": "[B]", "system": ARC_SYSTEM},
        {"prompt": "do cats purr?", "response": "[True]", "system": ""},
        {"prompt": "What is 2 + 3?", "response": "5"},
        {"prompt": "def f():"},
    ])
    task = load_task(str(path))
    assert task.name == "ARC-c_train" and task.source == str(path)
    mc, tf, free, prompt_only = task.records
    assert mc == TaskRecord(MC_PROMPT, "[B]", ARC_SYSTEM, ["[A]", "[B]", "[C]", "[D]"], "[B]")
    assert (tf.system, tf.options, tf.answer) == (None, TRUE_FALSE_OPTIONS, "[True]")  # "" system = none
    assert (free.options, free.answer) == (None, None)
    assert prompt_only.response is None
    assert task.prompts[2] == "What is 2 + 3?"


def test_jsonl_file_with_explicit_options(tmp_path):
    path = tmp_path / "colors.jsonl"
    path.write_text(
        json.dumps({"prompt": "Sky color?", "response": "blue", "options": ["red", "blue"], "answer": "blue"}) + "\n\n"
        + json.dumps({"prompt": "Grass color?", "response": "green"}) + "\n"
    )
    task = load_task(str(path))
    assert task.name == "colors"
    assert [r.options for r in task.records] == [["red", "blue"], None]


@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        ("Q?choices: A: protozoa, B: viruses, C: fungi", "[C]", (["[A]", "[B]", "[C]"], "[C]")),
        ("Q?\n1: one\n2: two\n3: three\n4: four", "[2]", (["[1]", "[2]", "[3]", "[4]"], "[2]")),
        ("Q?\nA: x\nB: y", "[C]", (None, None)),  # answer not among the listed options
        ("Q?\nA: x\nB: y", "A", (None, None)),  # free text is never turned into a choice
        ("Q?\nA: x\nB: y", None, (None, None)),
    ],
    ids=["inline-choices", "numeric-labels", "answer-not-listed", "unbracketed", "no-response"],
)
def test_infer_options(prompt, response, expected):
    assert infer_options(prompt, response) == expected


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.json", "  \n", r"empty\.json is empty"),
        ("broken.json", '[{"prompt": "a", "response": "b"},\n {"prompt": ', r"broken\.json: not valid JSON .* line 2"),
        ("broken.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c"\n', r"broken\.jsonl line 2: not valid JSON"),
        ("noprompt.json", '[{"prompt": "a", "response": "b"}, {"question": "c", "response": "d"}]',
         r"noprompt\.json record 1: expected a non-empty string field 'prompt', found no prompt \(keys: \['question'"),
        ("noprompt.jsonl", '{"prompt": "a"}\n{"prompt": "   ", "response": "d"}\n',
         r"noprompt\.jsonl line 2: .*'prompt'"),
        ("list.jsonl", '["a", "b"]\n', r"list\.jsonl line 1: expected a JSON object"),
        ("badanswer.json", '[{"prompt": "a", "response": "b", "options": ["x", "y"], "answer": "z"}]',
         r"record 0: 'answer' 'z' is not one of the options"),
        ("emptylist.json", "[]", r"has no records"),
    ],
    ids=["empty-file", "bad-json", "bad-jsonl-line", "record-without-prompt", "blank-prompt", "not-an-object",
         "answer-not-an-option", "empty-list"],
)
def test_bad_task_files_get_clear_errors(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        load_task(str(tmp_path / name))


@pytest.mark.parametrize("name", ["latin1.json", "latin1.jsonl"])
def test_a_task_file_that_is_not_utf8_is_named(tmp_path, name):
    (tmp_path / name).write_bytes('[{"prompt": "café?", "response": "oui"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"task file .*{name}' is not UTF-8 text \(byte 0xe9 at offset 16\); "
                                         "save it as UTF-8"):
        load_task(str(tmp_path / name))


def test_bad_specs(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_task(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match=r"is not a \.json/\.jsonl file, 'hf:"):
        load_task(str(tmp_path / "tasks.csv"))
    with pytest.raises(ValueError, match="unknown synthetic task family 'nope'; expected one of: add_numbers"):
        load_task("synthetic:nope")
    write_json(tmp_path / "bad name.json", [{"prompt": "a"}])
    with pytest.raises(ValueError, match="task name 'bad name'"):
        load_task(str(tmp_path / "bad name.json"))
    # No network in tests: a None entry in sys.modules makes `import datasets` fail like a missing package.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        load_task("hf:org/some-set:validation")


def test_duplicate_task_names_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    write_json(tmp_path / "a" / "add_numbers.json", [{"prompt": "1+1", "response": "2"}])
    with pytest.raises(ValueError, match="same task name 'add_numbers'"):
        load_tasks(["synthetic:add_numbers", str(tmp_path / "a" / "add_numbers.json")])


def _shift(word):
    return word.translate(str.maketrans(string.ascii_lowercase, string.ascii_lowercase[1:] + "a"))


def _options_of(prompt):
    return dict(re.findall(r"^([A-D]): (.*)$", prompt, flags=re.M))


def _mc_expected(pick):
    """Expected answer of a multiple-choice prompt: the label whose option text `pick` chooses."""
    def expected(record):
        options = _options_of(record.prompt)
        return f"[{pick(record.prompt, options)}]"
    return expected


# Independent re-computation of each family's answer from its prompt.
EXPECTED = {
    "reverse_word": lambda r: r.prompt.split(": ")[1][::-1],
    "sort_letters": lambda r: "".join(sorted(r.prompt.split()[4])),
    "add_numbers": lambda r: str(sum(map(int, re.findall(r"\d+", r.prompt)))),
    "uppercase": lambda r: r.prompt.split(": ")[1].upper(),
    "shift_letters": lambda r: _shift(r.prompt.split()[4]),
    "count_letters": lambda r: str(len(r.prompt.split()[-2])),
    "largest_number_mc": _mc_expected(lambda p, o: max(o, key=lambda k: int(o[k]))),
    "starts_with_mc": _mc_expected(
        lambda p, o: next(k for k, v in o.items() if v[0] == p.splitlines()[0].split()[-1][0])),
    "sum_mc": _mc_expected(lambda p, o: next(
        k for k, v in o.items() if int(v) == sum(map(int, re.findall(r"\d+", p.splitlines()[0]))))),
    "parity_tf": lambda r: f"[{int(r.prompt.split()[3]) % 2 == 0}]",
    "palindrome_tf": lambda r: f"[{r.prompt.split()[5] == r.prompt.split()[5][::-1]}]",
}


def test_at_least_eight_families_with_choice_and_true_false_kinds():
    assert set(EXPECTED) == set(SYNTHETIC_FAMILIES)
    kinds = Counter(family.kind for family in SYNTHETIC_FAMILIES.values())
    assert len(SYNTHETIC_FAMILIES) >= 8 and kinds["multiple_choice"] >= 2 and kinds["true_false"] >= 2


@pytest.mark.parametrize("family", sorted(SYNTHETIC_FAMILIES))
def test_synthetic_family_answers_are_correct_and_seeded(family):
    records = generate_records(family, 200, seed=3)
    assert records == generate_records(family, 200, seed=3)
    assert records[:50] == generate_records(family, 50, seed=3)
    assert records != generate_records(family, 200, seed=4)
    for record in records:
        assert record.prompt and record.response
        assert record.response == EXPECTED[family](record), record
    kind = SYNTHETIC_FAMILIES[family].kind
    if kind == "generation":
        assert all(r.options is None and r.answer is None for r in records)
        return
    answers = Counter(r.answer for r in records)
    for record in records:
        assert record.answer == record.response and record.answer in record.options
    if kind == "multiple_choice":
        assert all(r.options == ["[A]", "[B]", "[C]", "[D]"] for r in records)
        assert all(len(set(_options_of(r.prompt).values())) == 4 for r in records)  # distinct options
        assert set(answers) == {"[A]", "[B]", "[C]", "[D]"} and min(answers.values()) >= 25  # balanced
    else:
        assert all(r.options == TRUE_FALSE_OPTIONS for r in records)
        assert min(answers["[True]"], answers["[False]"]) >= 60
    # Loading through the spec gives the same records, with options inferred the same way as from a file.
    assert load_task(f"synthetic:{family}", num_records=20, seed=3).records == records[:20]
    assert all(infer_options(r.prompt, r.response) == (r.options, r.answer) for r in records)
