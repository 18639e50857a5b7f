"""lm-eval task files with a local dataset, and a byte-level BPE tokenizer trained on a corpus:
what a user's own benchmark and model bring, built in the tests."""

import json

import yaml


def write_task(folder, config, train, test):
    """The task's YAML with a local json dataset (train: the few-shot examples)."""
    name = config["task"]
    files = {}
    for split, docs in (("train", train), ("test", test)):
        files[split] = str(folder / f"{name}_{split}.jsonl")
        (folder / f"{name}_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {**config, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "training_split": "train",
              "test_split": "test"}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder / f"{name}.yaml"


def bpe_tokenizer(corpus):
    """A byte-level BPE trained on the tasks' text, saved as a PreTrainedTokenizerFast (no BOS, like OLMoE's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)
