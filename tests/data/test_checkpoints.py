import time
from dataclasses import replace

import pytest
import torch

from moegrok.config import CheckpointsConfig, ModelConfig
from moegrok.data.checkpoints import build_catalog, check_local_dir, content_key, load_checkpoint, parse_name
from moegrok.errors import CheckpointError
from tests.reference.models import save_tiny_moe


@pytest.mark.parametrize(
    ("name", "step", "tokens"),
    [
        ("step5000-tokens20B", 5000, 20e9),
        ("step1200000-tokens5033B", 1200000, 5033e9),
        ("stage1-step150-tokens1B", 150, 1e9),
        ("step150-tokens1B", 150, 1e9),
        ("step1000", 1000, None),
    ],
)
def test_olmo_names(name, step, tokens):
    assert parse_name(name) == (step, tokens)


def test_custom_regex_and_explicit_steps():
    assert parse_name("step-001000-2BT", step_regex=r"step-(?P<step>\d+)-(?P<tokens>\d+B)T") == (1000, 2e9)
    assert parse_name("pretrain_iter_0373000", step_regex=r"iter_(?P<step>\d+)") == (373000, None)
    assert parse_name("main", steps={"main": 1223842}) == (1223842, None)
    with pytest.raises(CheckpointError, match=r"checkpoint 'fp32': cannot read a step.*step5000-tokens20B"):
        parse_name("fp32")


def test_catalog_sources_and_selection(tmp_path):
    for step in (0, 10, 20, 30, 40, 50):
        (tmp_path / f"step{step}").mkdir()
    cfg = CheckpointsConfig(dir=str(tmp_path), paths=["allenai/OLMoE-1B-7B-0924@step5000-tokens20B"])
    refs = build_catalog(cfg)
    assert [r.step for r in refs] == [0, 10, 20, 30, 40, 50, 5000]
    hub = refs[-1]
    assert (hub.kind, hub.uri, hub.revision) == ("hub", "allenai/OLMoE-1B-7B-0924", "step5000-tokens20B")
    assert hub.tokens == 20e9
    offline = CheckpointsConfig(repo="allenai/OLMoE-1B-7B-0924",
                                revisions=["main", "step10000-tokens40B", "step5000-tokens20B"])
    assert [r.step for r in build_catalog(offline)] == [5000, 10000]
    assert [r.step for r in build_catalog(CheckpointsConfig(dir=str(tmp_path), every_nth=2))] == [0, 20, 40]
    assert [r.step for r in build_catalog(CheckpointsConfig(dir=str(tmp_path), num_evenly_spaced=3))] == [0, 20, 50]
    ranged = CheckpointsConfig(dir=str(tmp_path), min_step=15, max_step=40)
    assert [r.step for r in build_catalog(ranged)] == [20, 30, 40]
    url = build_catalog(CheckpointsConfig(paths=["s3://bucket/run/step7"]))[0]
    assert (url.kind, url.step) == ("url", 7)
    with pytest.raises(CheckpointError, match="checkpoints.dir="):
        build_catalog(CheckpointsConfig(dir=str(tmp_path / "missing")))


def test_bad_checkpoints_name_themselves(tmp_path):
    good = save_tiny_moe("olmoe", tmp_path / "step1")
    check_local_dir(good, "step1")
    with pytest.raises(CheckpointError, match="checkpoint 'step9'.*not a directory"):
        check_local_dir(tmp_path / "step9", "step9")
    (tmp_path / "step2").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint 'step2'.*no config.json"):
        check_local_dir(tmp_path / "step2", "step2")
    weights = good / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="checkpoint 'step1'.*truncated safetensors"):
        check_local_dir(good, "step1")


def test_load_local_and_fsspec_url_checkpoints(tmp_path):
    path = save_tiny_moe("mixtral", tmp_path / "src" / "step3")
    local = build_catalog(CheckpointsConfig(paths=[str(path)]))[0]
    model, _ = load_checkpoint(local, ModelConfig(), cache_dir=str(tmp_path / "cache"), device="cpu")
    assert type(model).__name__ == "MixtralForCausalLM" and model.dtype == torch.float32
    url = build_catalog(CheckpointsConfig(paths=[f"file://{path}"]))[0]
    from_url, _ = load_checkpoint(url, ModelConfig(dtype="bfloat16"), cache_dir=str(tmp_path / "cache"), device="cpu")
    assert from_url.dtype == torch.bfloat16
    memory = build_catalog(CheckpointsConfig(paths=["memory://bucket/step3"]))[0]
    import fsspec

    fs = fsspec.filesystem("memory")
    for file in path.iterdir():
        fs.pipe(f"/bucket/step3/{file.name}", file.read_bytes())
    cached, _ = load_checkpoint(memory, ModelConfig(), cache_dir=str(tmp_path / "cache"), device="cpu")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, model(ids).logits)


def test_weights_replaced_in_a_bucket_are_copied_again_never_read_stale(s3_endpoint, tmp_path):
    import pyarrow.fs as pafs

    from moegrok.store import filesystem

    ids = torch.tensor([[1, 5, 6, 7]])
    cache = str(tmp_path / "cache")

    def upload_and_load(seed: int):
        path = save_tiny_moe("mixtral", tmp_path / f"seed{seed}" / "step3", seed=seed)
        pafs.copy_files(str(path), "moegrok/replaced/step3", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem("s3", {}))
        ref = build_catalog(CheckpointsConfig(paths=["s3://moegrok/replaced/step3"]))[0]
        ref = replace(ref, content=content_key(ref))
        local, _ = load_checkpoint(build_catalog(CheckpointsConfig(paths=[str(path)]))[0], ModelConfig(),
                                   cache_dir=cache, device="cpu")
        return ref, load_checkpoint(ref, ModelConfig(), cache_dir=cache, device="cpu")[0], local

    first, cached, _ = upload_and_load(0)
    time.sleep(1.1)  # S3 keeps modification times in seconds
    second, fresh, replacement = upload_and_load(1)  # same names and sizes, other weights
    assert first.content != second.content
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, replacement(ids).logits)
        assert not torch.allclose(fresh(ids).logits, cached(ids).logits)
