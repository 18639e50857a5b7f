import json

import pandas as pd
import pytest

from moegrok.config import SamplesConfig
from moegrok.data.samples import read_samples, select_samples, shard_samples, tokenize_samples
from moegrok.errors import SampleError
from moegrok.toy.tokenizer import build_tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_and_parquet_sources(tmp_path):
    records = [{"id": "a", "group": "math", "prompt": "1 + 2 =", "completion": " 3"},
               {"id": 7, "group": "text", "text": "4 + 5 = 9"}]
    frame = read_samples(write_jsonl(tmp_path / "s.jsonl", records))
    assert frame["id"].tolist() == ["a", "7"]
    pd.DataFrame(records[:1]).to_parquet(tmp_path / "s.parquet")
    assert read_samples(tmp_path / "s.parquet")["completion"].tolist() == [" 3"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"s.jsonl:2: invalid JSON"),
        ('{"id": "b", "text": "x"}', r"s.jsonl:2: missing or empty 'group'"),
        ('{"id": "b", "group": "g", "prompt": "x"}', r"s.jsonl:2: needs either"),
        ('{"id": "a", "group": "g", "text": "x"}', r"duplicate sample id 'a'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"id": "a", "group": "g", "text": "1 + 1 = 2"}) + "\n" + line + "\n")
    with pytest.raises(SampleError, match=message):
        read_samples(path)


def test_subsampling_is_deterministic_per_group(tmp_path):
    records = [{"id": f"{g}{i}", "group": g, "text": "1 + 1 = 2"} for g in "xy" for i in range(50)]
    path = write_jsonl(tmp_path / "s.jsonl", records)
    cfg = SamplesConfig(paths=[str(path)], max_per_group=10, seed=3)
    first, second = select_samples(cfg), select_samples(cfg)
    pd.testing.assert_frame_equal(first, second)
    assert first.groupby("group").size().tolist() == [10, 10]
    assert not first["id"].equals(select_samples(SamplesConfig(paths=[str(path)], max_per_group=10, seed=4))["id"])
    with pytest.raises(SampleError, match=r"samples.groups: no samples of group\(s\) \['z'\]"):
        select_samples(SamplesConfig(paths=[str(path)], groups=["z"]))
    shards = shard_samples(first, shard_size=6)
    assert [len(s) for s in shards] == [6, 6, 6, 2]
    assert pd.concat(shards)["id"].tolist() == first["id"].tolist()


def test_tokenize_scores_the_completion_only():
    tokenizer = build_tokenizer(11)
    frame = pd.DataFrame([{"id": "a", "group": "g", "text": None, "prompt": "1 + 2 =", "completion": " 3"},
                          {"id": "b", "group": "g", "text": "4 + 5 = 9", "prompt": None, "completion": None}])
    pair, text = tokenize_samples(frame, tokenizer, max_tokens=64)
    assert pair.num_prompt_tokens == 5 and len(pair.input_ids) == 6  # <bos> 1 + 2 = | 3
    assert text.num_prompt_tokens == 1 and len(text.input_ids) == 6
    (cut,) = tokenize_samples(frame.iloc[:1], tokenizer, max_tokens=3)
    assert cut.input_ids.tolist()[-1] == tokenizer.convert_tokens_to_ids("3") and cut.num_prompt_tokens == 2
