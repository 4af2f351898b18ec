"""Task readers, the single-token rule (method.md §9.2), scoring, and the real BLiMP files."""

import json
import os

import pytest

from crossray.tasks import (
    TaskError,
    blimp_example,
    load_task,
    load_tasks,
    reduce_to_single_tokens,
    rows_to_task,
    score_task,
    word_example,
)
from tests.conftest import SHARED_BLIMP


class CharTokenizer:
    """One token per character: makes the 1- and 2-token cases of the rule easy to write by hand."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids)


def test_single_token_rule_by_hand():
    tok = CharTokenizer()
    ex = reduce_to_single_tokens(tok, "pre", "a", "b")
    assert (ex.clean_prefix, ex.clean_answer, ex.patch_answer) == ("pre", "a", "b")
    assert (ex.clean_answer_id, ex.patch_answer_id) == (ord("a"), ord("b"))
    ex = reduce_to_single_tokens(tok, "pre", "ab", "cd")  # 2 tokens, first differ: first tokens
    assert (ex.clean_prefix, ex.clean_answer, ex.patch_answer) == ("pre", "a", "c")
    ex = reduce_to_single_tokens(tok, "pre", "xb", "xc")  # shared first token joins the prefix
    assert (ex.clean_prefix, ex.clean_answer, ex.patch_answer) == ("prex", "b", "c")
    assert reduce_to_single_tokens(tok, "p", "abc", "abd") == "answer_too_long"
    assert reduce_to_single_tokens(tok, "p", "ab", "c") == "answer_length_mismatch"
    assert reduce_to_single_tokens(tok, "p", "a", "a") == "identical_answers"
    # nothing to condition on: skipped and counted (an empty prefix once crashed a live batch)
    assert reduce_to_single_tokens(tok, "", "a", "b") == "empty_prefix"


def test_blimp_token_prefix_split():
    tok = CharTokenizer()
    # "The dog is" vs "The dog xs": common token prefix is "The dog ", answers "i"/"x" (first tokens)
    ex = blimp_example(tok, "The dog ", " is", "xs")
    assert ex.clean_prefix == "The dog " and (ex.clean_answer, ex.patch_answer) == ("i", "x")


def test_word_level_split():
    tok = CharTokenizer()
    assert word_example(tok, "the cat sits", "the cat sit") == "answer_length_mismatch"
    assert word_example(tok, "we xa", "we ya") == "answer_too_long"  # " xa" is 3 characters
    ex = word_example(tok, "we x now", "we y now")  # " x"/" y": shared space joins the prefix
    assert (ex.clean_prefix, ex.clean_answer, ex.patch_answer) == ("we ", "x", "y")
    assert word_example(tok, "same", "same") == "no_differing_word"


def test_readers_on_toy_tokenizer(toy_tokenizer, tmp_path):
    blimp = {"sentence_good": "The dogs are here.", "sentence_bad": "The dogs is here.",
             "one_prefix_method": True, "one_prefix_prefix": "The dogs",
             "one_prefix_word_good": "are", "one_prefix_word_bad": "is", "pairID": "0"}
    t = rows_to_task([blimp], toy_tokenizer, "b", "mem")
    ex = t.examples[0]
    assert ex.clean_prefix == "The dogs" and ex.clean_answer == " are" and ex.patch_answer == " is"
    assert t.sentences == [("The dogs are here.", "The dogs is here.")]
    clams = {"clean_prefix": "The cats near the dog", "clean_answer": " are", "patch_answer": " is"}
    t = rows_to_task([clams], toy_tokenizer, "c", "mem")
    assert t.format == "clams" and t.examples[0].clean_answer_id == toy_tokenizer.encode(" are")[0]
    multi = {"sen": "The men were tired .", "wrong_sen": "The men was tired ."}
    t = rows_to_task([multi], toy_tokenizer, "m", "mem")
    assert t.format == "multiblimp" and t.examples[0].clean_prefix == "The men"
    assert (t.examples[0].clean_answer, t.examples[0].patch_answer) == (" were", " was")


def test_malformed_task_files(tmp_path, toy_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence_good": "a", "sentence_bad": "b", "one_prefix_method": True,
                               "one_prefix_prefix": "x", "one_prefix_word_good": "y"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: missing .*one_prefix_word_bad"):
        load_task(bad, toy_tokenizer)
    bad.write_text('{"sen": "a b"}\n{oops\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON"):
        load_task(bad, toy_tokenizer)
    with pytest.raises(TaskError, match="does not exist"):
        load_task(tmp_path / "missing.jsonl", toy_tokenizer)
    mixed = [{"sentence_good": "a", "sentence_bad": "b", "one_prefix_method": v,
              "one_prefix_prefix": "x", "one_prefix_word_good": "y", "one_prefix_word_bad": "z"}
             for v in (True, False)]
    with pytest.raises(TaskError, match="mixes one-prefix and two-prefix"):
        rows_to_task(mixed, toy_tokenizer, "m", "mem")


def test_toy_tasks_keep_everything(toy_dir, toy_tokenizer):
    for f in sorted((toy_dir / "tasks").glob("*.jsonl")):
        t = load_task(f, toy_tokenizer)
        assert len(t.examples) == t.n_rows and not t.skipped, (f.name, t.skipped)


def test_real_blimp_files_load_and_score(toy_family, toy_tokenizer):
    """Every real BLiMP agreement file loads whole, each row kept or skipped with a reason (never
    silently), and scores on a toy checkpoint: the first 64 rows of each (the scoring is the same
    code at any count: tests/test_screen.py and the runs score whole tasks)."""
    import dataclasses

    from crossray.models.layer import load_model

    if not SHARED_BLIMP.exists():
        if os.environ.get("CI"):  # CI has ../shared beside the clone: the real files must be scored
            pytest.fail(f"{SHARED_BLIMP} is missing in CI")
        pytest.skip("../shared/data/blimp not present")
    files = sorted(SHARED_BLIMP.glob("*.jsonl"))
    assert len(files) == 15
    tasks = load_tasks(files, toy_tokenizer)
    assert [t.name for t in tasks] == [f.stem for f in files]
    for t in tasks:
        assert len(t.examples) + sum(t.skipped.values()) == t.n_rows == 1000  # nothing silent
        assert len(t.sentences) == 1000
        if t.name.endswith("_2") and "irregular_plural" not in t.name and "adj_irregular_1" not in t.name:
            assert t.skipped.get("two_prefix") == 1000
    model = load_model(toy_family, toy_family.available_revisions()[-1], device="cpu")
    rows = [score_task(model, toy_tokenizer, dataclasses.replace(t, examples=t.examples[:64],
                                                                 sentences=t.sentences[:64]))
            for t in tasks]
    print("\nreal BLiMP on the toy family (kept/skipped, prefix and sentence accuracy of the first 64):")
    for t, r in zip(tasks, rows, strict=True):
        print(f"  {t.name:50s} kept {len(t.examples):4d} skipped {dict(t.skipped)} "
              f"prefix {r['prefix_accuracy']:.3f} sentence {r['sentence_accuracy']:.3f}")
    assert len(rows) == 15 and all(0 <= r["sentence_accuracy"] <= 1 and r["n_sentence"] == 64 for r in rows)
    assert all(r["n_prefix"] == min(64, len(t.examples)) for t, r in zip(tasks, rows, strict=True))


def test_sentence_scores_do_not_depend_on_the_batch(tmp_path):
    """Left padding must not leak into full-sentence scores: a random model scores every sentence
    the same alone and in a batch with longer ones, so pairs where only the bad sentence is padded
    are not all 'correct'."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from crossray.tasks import sentence_logprobs
    from tests.conftest import tiny_config

    words = ["<eos>", "the", "dog", "dogs", "runs", "run", "near", "big", "cat", "cats", "and", "see", "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("gpt_neox", vocab=len(words))).eval()
    goods = ["the dog runs", "a cat runs", "the cats run", "big dogs run"] * 10  # one length: no padding
    bads = ["the dog run", "a cats run", "the cat runs", "big dog run"] * 10
    bads[0] = "the dogs runs and the big cats see a dog near the cat"  # pads every other bad sentence
    alone = torch.cat([sentence_logprobs(model, tokenizer, [s]) for s in goods + bads])
    batched = torch.cat([sentence_logprobs(model, tokenizer, goods, batch_size=64),
                         sentence_logprobs(model, tokenizer, bads, batch_size=64)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    n = len(goods)
    acc_alone = (alone[:n] > alone[n:]).float().mean()
    acc_batched = (batched[:n] > batched[n:]).float().mean()
    assert acc_batched == acc_alone


def test_task_file_encoding(tmp_path, toy_tokenizer):
    """A BOM and CRLF are editor artefacts, accepted; invalid UTF-8 names the file and the line."""
    from crossray.tasks import TaskError, load_task

    rows = [json.dumps({"sentence_good": "the dog runs .", "sentence_bad": "the dog run ."})] * 3
    ok = tmp_path / "bom.jsonl"
    ok.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode() + b"\r\n")
    assert load_task(ok, toy_tokenizer).n_rows == 3
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes("\n".join(rows[:2]).encode() + b'\n{"sentence_good": "caf\xe9", "sentence_bad": "x"}\n')
    with pytest.raises(TaskError, match=r"latin1.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 23\)"):
        load_task(bad, toy_tokenizer)


def test_task_names_are_checked_before_any_compute(toy_dir, tmp_path):
    """Two task files of one name (in two folders) would merge their rows in every table and share a
    stage key: refused at validation, naming both; so is a name MLflow cannot use in a metric key."""
    import shutil

    from crossray.config import load_config
    from crossray.pipeline.runner import Pipeline
    from crossray.tasks import TaskError
    from tests.helpers import light_pipeline_config

    source = toy_dir / "tasks" / "simple_agreement.jsonl"
    for folder, name in (("dup1", "agree"), ("dup2", "agree"), ("odd", "subj+verb (v2)")):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / f"{name}.jsonl")

    def validate(*tasks):
        config = light_pipeline_config(tmp_path, toy_dir, changes={"pipeline.tasks": [str(t) for t in tasks]})
        Pipeline(load_config(config), backend=None).validate()

    with pytest.raises(TaskError, match=rf"two tasks are named agree: {tmp_path}/dup1/agree.jsonl and "
                                        rf"{tmp_path}/dup2/agree.jsonl"):
        validate(tmp_path / "dup1", tmp_path / "dup2")
    with pytest.raises(TaskError, match=r"task subj\+verb \(v2\) .*cannot name MLflow metrics .*rename"):
        validate(tmp_path / "odd")
    validate(tmp_path / "dup1", source)  # distinct names pass
    assert not (tmp_path / "runs" / "tiny").exists()
