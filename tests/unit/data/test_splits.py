"""download_and_split: sources (JSONL, JSON, Parquet, save_to_disk), normalisation, seeded split."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deepspec.data import load_eval_prompts, read_conversations
from deepspec.data.splits import load_rows, normalize_row, normalize_rows, split_conversations
from deepspec.errors import DataError
from deepspec.utils.distributed import find_free_port
from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "scripts", "data", "download_and_split.py")

ROWS = [
    {"id": "a", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"messages": [{"from": "human", "value": "sharegpt q"}, {"from": "gpt", "value": "sharegpt a"}]},
    {"instruction": "Translate", "input": "bonjour", "output": "hello", "source": "alpaca"},
    {"question": "2+2?", "answer": "4"},
    {"prompt": "only a prompt"},
    {"turns": ["first turn", "second turn"]},
    {"text": "no prompt field"},
    {"id": "a", "prompt": "duplicate id"},
]


def run(args, **kw):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, **kw
    )


def test_row_shapes_are_normalised():
    convs, skipped = normalize_rows(iter(ROWS), "ds")
    assert [c.id for c in convs] == ["a", "ds-1", "ds-2", "ds-3", "ds-4", "ds-5"]
    assert convs[1].messages == [
        {"role": "user", "content": "sharegpt q"},
        {"role": "assistant", "content": "sharegpt a"},
    ]
    assert convs[2].messages[0]["content"] == "Translate\n\nbonjour" and convs[2].extra == {
        "source": "alpaca"
    }
    assert convs[3].messages[1] == {"role": "assistant", "content": "4"}
    assert convs[4].messages == [{"role": "user", "content": "only a prompt"}]
    assert convs[5].messages == [{"role": "user", "content": "first turn"}]
    assert skipped == {"no conversation or prompt field": 1, "duplicate id": 1}
    with pytest.raises(ValueError, match="expected an object"):
        normalize_row([1], "x")


def test_split_is_seeded_disjoint_and_ordered():
    convs, _ = normalize_rows(iter([{"prompt": f"p{i}"} for i in range(50)]), "d")
    train, held = split_conversations(convs, test_size=0.2, seed=7)
    again, held_again = split_conversations(convs, test_size=0.2, seed=7)
    _, other = split_conversations(convs, test_size=0.2, seed=8)
    assert len(held) == 10 and len(train) == 40
    assert [c.id for c in held] == [c.id for c in held_again] and [c.id for c in held] != [
        c.id for c in other
    ]
    assert not {c.id for c in train} & {c.id for c in held}
    assert [c.id for c in train] == sorted((c.id for c in train), key=lambda s: int(s.split("-")[1]))
    assert len(split_conversations(convs, test_size=3, seed=0)[1]) == 3
    with pytest.raises(DataError, match="only 50"):
        split_conversations(convs, test_size=51, seed=0)


def test_file_formats_and_saved_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{"id": f"r{i}", "prompt": f"q{i}", "response": f"a{i}"} for i in range(4)]
    (tmp_path / "rows.json").write_text(json.dumps(flat))
    pq.write_table(pa.Table.from_pylist(flat), tmp_path / "rows.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(flat)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("rows.json", "rows.parquet", "saved"):
        rows = list(load_rows(str(tmp_path / source)))
        assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"], source
    with pytest.raises(DataError, match="no split 'test'"):
        list(load_rows(str(tmp_path / "saved"), split="test"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON row"):
        list(load_rows(str(tmp_path / "bad.jsonl")))


def test_script_writes_train_and_eval_files(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out, ev = tmp_path / "out", tmp_path / "eval"
    args = [
        "--input",
        str(src),
        "--name",
        "toy",
        "--test-size",
        "2",
        "--output-dir",
        str(out),
        "--eval-dir",
        str(ev),
    ]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    assert "6 conversations (2 rows skipped" in proc.stdout
    train = list(read_conversations(out / "train.jsonl"))
    held = load_eval_prompts("toy", ev)
    assert len(train) == 4 and len(held) == 2
    assert not {c.messages[0]["content"] for c in train} & {p.text for p in held}
    again = run(args)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    skipped = run([*args, "--skip-existing"])
    assert skipped.returncode == 0 and skipped.stdout.startswith("skip:")


def test_offline_hub_fails_at_once_with_one_line(tmp_path):
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{find_free_port()}")
    proc = run(["--input", "someone/some-dataset", "--output-dir", str(tmp_path)], env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "dataset hub cannot be reached" in proc.stderr
    missing = run(["--input", "./nope.jsonl", "--output-dir", str(tmp_path)])
    assert missing.returncode == 2 and "not found" in missing.stderr
