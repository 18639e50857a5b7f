"""Everything a sweep checks before it writes the first file of its run directory or shows a
progress bar, and what it reads doing so, handed on to the stages.

Checked, each a UserError in one line (exit status 2): input files that are missing or empty, the
cluster to join (sizes that only a Ray of our own takes; an address that refuses or does not
answer), the checkpoint catalog (names, the directory's pattern), the samples (a file whose lines
are all bad, duplicate ids, samples cut by samples.max_tokens when samples.truncation=error), the
residue tokens of the embedding measure (each a single token of the tokenizer), the control group
of the contrast (one of the sample groups), exact-match answers longer than eval.max_new_tokens,
and code benchmarks on a machine that cannot isolate generated code (no bubblewrap) unless
eval.sandbox=unisolated. The tokenizer checks are remembered in the run directory (`.preflight`), so a
re-run whose inputs did not change does not load a tokenizer for them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moegrok.config import Sandbox, Stage, SweepConfig, config_yaml
from moegrok.data.checkpoints import (
    CheckpointRef,
    build_catalog,
    catalog_frame,
    content_key,
    incomplete,
    load_tokenizer,
    refs_from_frame,
)
from moegrok.errors import CheckpointError, ConfigError, SampleError, SandboxError, UserError
from moegrok.evaluation.sandbox import require_isolation
from moegrok.evaluation.scoring import longest_answer
from moegrok.pipeline.cluster import check_cluster
from moegrok.pipeline.evaluate import Benchmarks, load_benchmarks
from moegrok.pipeline.shards import Shards, plan_shards
from moegrok.store import RunDir, as_path, fingerprint, read_parquet, write_parquet, write_text


@dataclasses.dataclass
class Inputs:
    """What the checks read: the checkpoints, the sample shards (record), the benchmarks
    (evaluate); `save` writes what the run directory keeps of them."""

    refs: list[CheckpointRef]
    shards: Shards | None = None
    benchmarks: Benchmarks | None = None
    catalog_changed: bool = False
    checked: str | None = None  # the key of the tokenizer checks, when they ran

    def save(self, cfg: SweepConfig, run: RunDir) -> None:
        run.root.mkdir(parents=True, exist_ok=True)
        if self.catalog_changed:
            write_parquet(catalog_frame(self.refs), run.catalog)
        write_text(config_yaml(cfg), run.config)
        if self.shards is not None:
            self.shards.save(run)
        if self.checked is not None:
            write_text(self.checked, run.root / ".preflight")


def check_files(cfg: SweepConfig, stages: list[Stage]) -> None:
    """Every input file the stages read exists and is not empty."""
    def need(path: str, key: str) -> None:
        file = as_path(path)
        if not file.is_file():
            raise UserError(f"{key}={path!r}: no such file")
        if file.stat().st_size == 0:
            raise UserError(f"{key}={path!r}: the file is empty")

    if Stage.record in stages:
        if not cfg.samples.paths:
            raise SampleError("samples.paths is empty: give at least one jsonl/parquet sample file")
        for index, path in enumerate(cfg.samples.paths):
            need(path, f"samples.paths[{index}]")
        if cfg.checkpoints.dir and not as_path(cfg.checkpoints.dir).is_dir():
            raise CheckpointError(f"checkpoints.dir={cfg.checkpoints.dir!r} is not a directory")
    if Stage.evaluate in stages:
        for bench in cfg.eval.benchmarks:
            need(bench.path, f"eval.benchmarks[{bench.name}].path")
    if Stage.tune in stages and cfg.tune.data:
        need(cfg.tune.data, "tune.data")


def catalog(cfg: SweepConfig, run: RunDir, stages: list[Stage]) -> tuple[list[CheckpointRef], bool]:
    """The checkpoints, each with a key of its current content (so replaced weights re-run), and
    whether catalog.parquet must be rewritten. While watching, a checkpoint still being written is
    left for the next round. Stages that load no checkpoint use the stored catalog."""
    if not ({Stage.record, Stage.tune, Stage.evaluate} & set(stages) or not run.catalog.exists()):
        return refs_from_frame(read_parquet(run.catalog)), False
    try:
        refs = build_catalog(cfg.checkpoints)
    except CheckpointError:
        if cfg.watch.enabled and cfg.checkpoints.dir and as_path(cfg.checkpoints.dir).is_dir():
            return [], False  # no checkpoint written yet
        raise
    if cfg.watch.enabled:
        waiting = {ref.name: reason for ref in refs if (reason := incomplete(ref))}
        if waiting:
            print(f"waiting for {len(waiting)} checkpoint(s) still being written: {', '.join(waiting)}")
        refs = [ref for ref in refs if ref.name not in waiting]
    return [dataclasses.replace(ref, content=content_key(ref)) for ref in refs], True


def _groups(run: RunDir, shards: Shards | None) -> list[str] | None:
    if shards is not None:
        return shards.groups
    if run.samples.exists():
        return sorted(set(read_parquet(run.samples, columns=["group"])["group"]))
    return None


def _check_truncation(cfg: SweepConfig, shards: Shards) -> None:
    if shards.truncated.empty:
        return
    cut = "; ".join(f"{row.group}: {row.samples} sample(s) lost {row.tokens_lost} token(s), at most "
                    f"{row.most_lost}" for row in shards.truncated.itertuples(index=False))
    where = (f"samples.max_tokens={cfg.samples.max_tokens}" if cfg.samples.max_tokens
             else f"the model's context length, {shards.max_tokens} tokens")
    if cfg.samples.truncation == "error":
        raise SampleError(f"samples cut to {where} (samples.truncation=error): {cut}")
    if shards.pending is not None:  # said once, when the samples are tokenized
        print(f"samples cut to {where}: {cut} (samples.truncation=error makes this an error)")


def _check_residue_tokens(cfg: SweepConfig, tokenizer) -> None:
    num_residues = cfg.model.residue_tokens
    tokens = [str(i) for i in range(num_residues)]
    unknown = [t for t, i in zip(tokens, tokenizer.convert_tokens_to_ids(tokens), strict=True)
               if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise ConfigError(f"config key model.residue_tokens={num_residues}: the embedding measure needs the tokens "
                          f"0..{num_residues - 1} as single tokens of the tokenizer; {len(unknown)} are not "
                          f"(first: {unknown[0]!r}); set model.residue_tokens=0 for a model that is not a toy zoo")


def _check_answers(cfg: SweepConfig, benchmarks: Benchmarks, tokenizer) -> None:
    limit = cfg.eval.max_new_tokens
    for name, items in benchmarks.items.items():
        longest = longest_answer(items, tokenizer)
        if limit is not None and longest is not None and longest[1] > limit:
            raise ConfigError(f"config key eval.max_new_tokens={limit}: benchmark {name!r} has exact answers of up "
                              f"to {longest[1]} tokens (item {longest[0]!r}), so they could never match; raise it "
                              "or set it to null (the longest answer + 4)")


def check_inputs(cfg: SweepConfig, run: RunDir, stages: list[Stage]) -> Inputs:
    """Check every input of the stages, reading what they need; nothing is written."""
    check_files(cfg, stages)
    check_cluster(cfg.cluster)
    refs, catalog_changed = catalog(cfg, run, stages)
    inputs = Inputs(refs, catalog_changed=catalog_changed)
    if not refs:
        return inputs
    loaded: dict = {}

    def tokenizer():
        if "tokenizer" not in loaded:
            loaded["tokenizer"], loaded["path"] = load_tokenizer(refs, cache_dir=cfg.checkpoints.cache_dir,
                                                                 trust_remote_code=cfg.model.trust_remote_code)
        return loaded["tokenizer"]

    def checkpoint() -> Path:
        tokenizer()
        return loaded["path"]

    if Stage.record in stages:
        inputs.shards = plan_shards(cfg, run, refs, tokenizer, checkpoint)
        _check_truncation(cfg, inputs.shards)
    groups = _groups(run, inputs.shards)
    if cfg.analysis.control is not None and groups is not None and cfg.analysis.control not in groups:
        raise ConfigError(f"config key analysis.control={cfg.analysis.control!r}: no such group in the samples "
                          f"(groups: {', '.join(groups)}); set it to one of them or to null (each group against "
                          "the others' mean)")
    if Stage.evaluate in stages:
        inputs.benchmarks = load_benchmarks(cfg)
        code = [name for name, items in inputs.benchmarks.items.items() if any(i.kind == "code" for i in items)]
        if code and cfg.eval.sandbox == Sandbox.isolated:
            try:
                require_isolation()
            except SandboxError as e:
                raise SandboxError(f"eval.benchmarks[{code[0]}] has code items, and {e}") from None
    key = fingerprint(refs[0].identity, refs[0].content, cfg.model.residue_tokens, cfg.eval.max_new_tokens,
                      inputs.benchmarks.hashes if inputs.benchmarks else None, Stage.record in stages)
    stored = run.root / ".preflight"
    if not (stored.exists() and stored.read_text() == key):
        if Stage.record in stages and cfg.model.residue_tokens:
            _check_residue_tokens(cfg, tokenizer())
        if inputs.benchmarks is not None and cfg.eval.max_new_tokens is not None:
            _check_answers(cfg, inputs.benchmarks, tokenizer())
        inputs.checked = key
    return inputs
