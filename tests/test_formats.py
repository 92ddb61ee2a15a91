"""Data formats (TRL's conventions): text, prompt-completion, messages, conversational prompt-completion; their
loss masks against an independent tokenisation; the data's own splits; tiny tasks; one input format from
training to generation and export."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
import torch

import bora_pyro
from bora_pyro.cli import main
from bora_pyro.data import IGNORE_INDEX
from bora_pyro.data.formats import Example
from bora_pyro.data.input_format import InputFormat
from bora_pyro.data.tokenize import encode_document
from bora_pyro.evaluation.generation_scores import heldout_examples, score_generations
from bora_pyro.models.likelihood import lm_log_likelihood

# A ChatML-like template for the byte tokenizer (which has none): special tokens <bos>/<eos> as text.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_lm(tiny_lm):
    lm, tokenizer = tiny_lm
    tokenizer.chat_template = TEMPLATE
    return lm, tokenizer


def conversation(i: int) -> list[dict]:
    return [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"answer {i}"},
        {"role": "user", "content": "and?"},
        {"role": "assistant", "content": f"more {i}"},
    ]


def scored_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


def expected_mask(tokenizer, text: str, scored_spans: list[tuple[int, int]]):
    """Independent tokenisation of the whole rendered text, and which of its tokens lie in ``scored_spans``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [any(a <= s and e <= b for a, b in scored_spans) for s, e in encoded["offset_mapping"]]
    return encoded["input_ids"], inside


def test_messages_mask_is_exactly_the_assistant_turns(chat_lm):
    _, tokenizer = chat_lm
    messages = conversation(7)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for content in ("answer 7", "more 7"):  # the turn's content and the end-of-turn the template writes after it
        start = text.index(f"<|assistant|>{content}") + len("<|assistant|>")
        spans.append((start, start + len(content) + len("<eos>\n")))
    ids, inside = expected_mask(tokenizer, text, spans)
    fmt = InputFormat("messages", chat_template=TEMPLATE)
    (chunk_ids, labels), *rest = encode_document(tokenizer, Example(None, tuple(messages)), 512, "t", None, fmt).chunks
    assert not rest and list(chunk_ids) == ids
    assert [label != IGNORE_INDEX for label in labels] == inside
    assert all(label in (IGNORE_INDEX, i) for label, i in zip(labels, chunk_ids))
    assert scored_text(tokenizer, chunk_ids, labels) == "answer 7<eos>\nmore 7<eos>\n"


def test_conversational_prompt_completion_scores_the_completion_only(chat_lm):
    _, tokenizer = chat_lm
    prompt, completion = tuple(conversation(1)[:4]), ({"role": "assistant", "content": "done"},)
    fmt = InputFormat("conversational prompt-completion", chat_template=TEMPLATE)
    ((ids, labels),) = encode_document(tokenizer, Example(prompt, completion), 512, "t", None, fmt).chunks
    text = tokenizer.apply_chat_template([*prompt, *completion], tokenize=False)
    start = len(tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True))
    expected_ids, inside = expected_mask(tokenizer, text, [(start, len(text))])
    assert list(ids) == expected_ids and [label != IGNORE_INDEX for label in labels] == inside
    assert scored_text(tokenizer, ids, labels) == "done<eos>\n"  # the prompt's assistant turn is context here


def test_prompt_completion_mask_and_whole_text_option(tiny_lm):
    _, tokenizer = tiny_lm
    example = Example("Q: 2+2=", "4")
    fmt = InputFormat("prompt-completion", task_prompt="{task}: ")
    ((ids, labels),) = encode_document(tokenizer, example, 64, "sum", None, fmt).chunks
    expected = tokenizer("<bos>sum: Q: 2+2=4<eos>", add_special_tokens=False)["input_ids"]
    assert list(ids) == expected
    assert scored_text(tokenizer, ids, labels) == "4<eos>"
    whole = InputFormat("prompt-completion", task_prompt="{task}: ", completion_only_loss=False)
    ((ids2, labels2),) = encode_document(tokenizer, example, 64, "sum", None, whole).chunks
    assert ids2 == ids and scored_text(tokenizer, ids2, labels2) == "Q: 2+2=4<eos>"  # task prompt and BOS: context


def test_the_loss_counts_completion_tokens_only(chat_lm):
    """The log-likelihood of a prompt-completion batch is the sum of the completion tokens' log-probabilities
    (by hand from the logits), whatever the prompt tokens would predict; whole-text loss is another number."""
    lm, tokenizer = chat_lm
    rows = [{"task": "a", "prompt": f"prompt number {i} ", "completion": f"c{i}"} for i in range(6)]
    corpus = bora_pyro.load_corpus(rows, tokenizer, split_column=None)
    bora = bora_pyro.BoRA(lm, tasks=corpus.tasks, rank=2, alpha=4, tau=1.0)
    batch = corpus.train.collate(list(range(len(corpus.train))))
    with torch.no_grad():
        loglik = lm_log_likelihood(bora.lora, None, batch)
        logp = torch.log_softmax(
            bora.lora.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1
        )
    for row in range(len(batch)):
        ids, labels = batch.input_ids[row], batch.labels[row]
        scored = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
        by_hand = sum(logp[row, t - 1, ids[t]] for t in scored)
        assert torch.allclose(loglik[row], by_hand, atol=1e-4)
        everything = sum(logp[row, t - 1, ids[t]] for t in range(1, int(batch.attention_mask[row].sum())))
        assert not torch.allclose(loglik[row], everything, atol=1e-2)  # the prompt's tokens are not in it


def test_a_long_example_keeps_its_completion_and_loses_the_start_of_its_prompt(tiny_lm):
    _, tokenizer = tiny_lm
    fmt = InputFormat("prompt-completion")
    encoded = encode_document(tokenizer, Example("p" * 50 + "END", "answer"), 20, "t", None, fmt)
    ((ids, labels),) = encoded.chunks
    assert encoded.prompt_cut and len(ids) == 20
    assert tokenizer.decode(ids) == "<bos>" + "p" * 9 + "END" + "answer<eos>"
    assert scored_text(tokenizer, ids, labels) == "answer<eos>"
    # a completion that alone does not fit: the prompt is left out and the completion split into chunks
    encoded = encode_document(tokenizer, Example("prompt", "x" * 30), 12, "t", None, fmt)
    assert encoded.prompt_cut and encoded.long and len(encoded.chunks) == 3
    assert "".join(scored_text(tokenizer, i, lab) for i, lab in encoded.chunks) == "x" * 30 + "<eos>"


def test_long_prompts_are_counted_and_said(tiny_lm, caplog):
    rows = [{"task": "a", "prompt": "p" * 80, "completion": "c"} for _ in range(5)]
    with caplog.at_level("WARNING"):
        corpus = bora_pyro.load_corpus(rows, tiny_lm[1], max_tokens=32, split_column=None)
    assert sum(corpus.documents()[s]["prompt_cut"] for s in ("train", "valid", "test")) == 5
    assert "prompts were cut from the left" in caplog.text


def test_format_is_detected_from_the_columns_and_can_be_forced(chat_lm, tmp_path):
    _, tokenizer = chat_lm
    text = [{"task": "a", "text": f"t{i}", "prompt": "p", "completion": f"c{i}"} for i in range(4)]
    assert bora_pyro.load_corpus(text, tokenizer).input_format.data_format == "prompt-completion"
    forced = bora_pyro.load_corpus(text, tokenizer, data_format="text")
    assert forced.input_format.data_format == "text"
    messages = [{"task": "a", "messages": conversation(i), "text": "x"} for i in range(4)]
    assert bora_pyro.load_corpus(messages, tokenizer).input_format.data_format == "messages"
    with pytest.raises(ValueError, match=r"--data-format messages needs the column\(s\) \['messages'\]"):
        bora_pyro.load_corpus(text, tokenizer, data_format="messages")


def test_messages_in_csv_jsonl_datasets_and_python_give_the_same_corpus(chat_lm, tmp_path):
    _, tokenizer = chat_lm
    rows = [{"task": "ab"[i % 2], "messages": conversation(i)} for i in range(8)]
    csv = tmp_path / "c.csv"
    pd.DataFrame({"task": [r["task"] for r in rows], "messages": [json.dumps(r["messages"]) for r in rows]}).to_csv(
        csv, index=False
    )
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    digests = {
        source: bora_pyro.load_corpus(data, tokenizer).content_sha256()
        for source, data in {
            "csv": f"csv:{csv}",
            "jsonl": f"jsonl:{jsonl}",
            "datasets": f"datasets:{saved}",
            "list": rows,
            "frame": pd.DataFrame(rows),
            "dataset": datasets.Dataset.from_list(rows),
        }.items()
    }
    assert len(set(digests.values())) == 1, digests


def test_a_csv_cell_of_invalid_json_names_its_line(chat_lm, tmp_path):
    path = tmp_path / "c.csv"
    good = json.dumps(conversation(0)).replace('"', '""')
    path.write_text(f'task,messages\na,"{good}"\na,"[{{""role"": ""user"", ""content"": ]"\n')
    with pytest.raises(ValueError, match=r"c\.csv: line 3: the 'messages' value is not valid JSON"):
        bora_pyro.load_corpus(f"csv:{path}", chat_lm[1])


@pytest.mark.parametrize(
    "messages, message",
    [
        ('"just text"', r"the 'messages' value is not valid JSON"),
        ("[]", r"expected a non-empty list of messages"),
        ('[{"content": "x"}]', r"message 0 of 'messages' has role None"),
        ('[{"role": "user", "content": null}]', r"message 0 of 'messages' \(role 'user'\) has content None"),
        ('["hello"]', r"message 0 of 'messages' is 'hello'; expected an object"),
    ],
)
def test_bad_messages_are_one_line_naming_the_line(chat_lm, tmp_path, messages, message):
    path = tmp_path / "c.jsonl"
    path.write_text(
        f'{{"task": "a", "messages": {json.dumps(conversation(0))}}}\n{{"task": "a", "messages": {messages}}}\n'
    )
    with pytest.raises(ValueError, match=rf"line 2: .*{message}"):
        bora_pyro.load_corpus(f"jsonl:{path}", chat_lm[1])


def test_prompt_and_completion_of_different_kinds_are_refused(chat_lm):
    rows = [
        {"task": "a", "prompt": "text", "completion": "text"},
        {"task": "a", "prompt": json.dumps(conversation(0)[:2]), "completion": "plain"},
    ]
    with pytest.raises(ValueError, match=r"must both be texts, or both message lists .*\(row 2\)"):
        bora_pyro.load_corpus(rows, chat_lm[1])


def test_no_chat_template_is_one_line_and_a_template_file_works(tiny_lm, tmp_path):
    rows = [{"task": "a", "messages": conversation(i)} for i in range(4)]
    with pytest.raises(ValueError, match=r"has no chat template.*--chat-template FILE"):
        bora_pyro.load_corpus(rows, tiny_lm[1])
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    corpus = bora_pyro.load_corpus(rows, tiny_lm[1], chat_template=str(template))
    assert corpus.input_format.chat_template == TEMPLATE


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_lm):
    _, tokenizer = chat_lm
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
    rows = [{"task": "a", "messages": conversation(i)} for i in range(3)]
    with pytest.raises(ValueError, match=r"does not render a conversation as an extension of its beginning"):
        bora_pyro.load_corpus(rows, tokenizer)


def test_a_split_column_is_used_as_given(tiny_lm):
    rows = [{"task": "a", "text": f"doc {i}", "split": s} for i, s in enumerate(["train"] * 5 + ["test", "valid"])]
    rows += [{"task": "b", "text": "only train", "split": "Train"}, {"task": "b", "text": "t", "split": " validation"}]
    corpus = bora_pyro.load_corpus(rows, tiny_lm[1])
    held = {s: [(t, d) for t, d in corpus.heldout[s]] for s in ("valid", "test")}
    assert held == {"valid": [(0, "doc 6"), (1, "t")], "test": [(0, "doc 5")]}
    assert list(corpus.train.docs_per_task()) == [5, 1] and list(corpus.test.docs_per_task()) == [1, 0]
    assert bora_pyro.load_corpus(rows, tiny_lm[1], split_column=None).content_sha256() != corpus.content_sha256()


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"task": "a", "text": "x", "split": "holdout"}], r"'split' column holds \['holdout'\] \(row 1\)"),
        ([{"task": "a", "text": "x", "split": "test"}], r"task\(s\) \['a'\] have no training document"),
    ],
)
def test_bad_split_values_are_one_line(tiny_lm, rows, message):
    with pytest.raises(ValueError, match=message):
        bora_pyro.load_corpus(rows, tiny_lm[1])


def test_a_dataset_dicts_splits_are_used_as_given(tiny_lm, tmp_path):
    def part(n, tag):
        return datasets.Dataset.from_list([{"task": "ab"[i % 2], "text": f"{tag} {i}"} for i in range(n)])

    dd = datasets.DatasetDict({"train": part(6, "tr"), "validation": part(2, "va"), "test": part(4, "te")})
    corpus = bora_pyro.load_corpus(dd, tiny_lm[1])
    assert sorted(d for _, d in corpus.heldout["test"]) == ["te 0", "te 1", "te 2", "te 3"]
    assert int(corpus.train.docs_per_task().sum()) == 6 and int(corpus.valid.docs_per_task().sum()) == 2
    dd.save_to_disk(str(tmp_path / "dd"))
    assert bora_pyro.load_corpus(f"datasets:{tmp_path / 'dd'}", tiny_lm[1]).content_sha256() == corpus.content_sha256()
    with pytest.raises(ValueError, match=r"split\(s\) \['extra'\] are not train, validation"):
        bora_pyro.load_corpus(datasets.DatasetDict({"train": part(4, "a"), "extra": part(2, "b")}), tiny_lm[1])


def test_tasks_of_one_and_two_documents_are_trained_and_said_unscored(tmp_path, capsys):
    rows = [{"task": "big", "text": f"some words number {i}"} for i in range(20)]
    rows += [{"task": "one", "text": "a single document"}] + [{"task": "two", "text": f"doc {i}"} for i in range(2)]
    path = tmp_path / "c.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    from .conftest import train_args

    main(train_args(path, tmp_path / "run"))
    out = capsys.readouterr().out
    assert "1 of 3 tasks have test documents and a test score; the other 2 are trained but unscored" in out
    table = pd.read_csv(tmp_path / "run" / "per_task.csv").set_index("task")
    assert table.loc[["one", "two"], "n_train_docs"].tolist() == [1, 2]
    assert table.loc[["one", "two"], "test_ppl"].isna().all() and table.loc["big", "test_ppl"] > 0
    adapters = bora_pyro.load_run(tmp_path / "run").rows([1, 2])
    assert all(float(v.abs().sum()) > 0 for v in adapters.values())  # trained, not left at their start (B = 0)
    # the hold-out minimum is configurable: 20 documents < 25 keeps everything for training
    corpus = bora_pyro.load_corpus(
        f"csv:{path}", bora_pyro.load_base_model("tiny-random-llama")[1], holdout_min_docs=25
    )
    assert len(corpus.test) == 0 and list(corpus.train.docs_per_task()) == [20, 1, 2]


def test_generate_feeds_the_prompt_ids_of_training(chat_lm):
    """A prompt's ids in generate are exactly those the same prompt has in a training example."""
    _, tokenizer = chat_lm
    cases = [
        (
            InputFormat("prompt-completion", task_prompt="{task}: "),
            Example("Translate: hello", "hei"),
            "Translate: hello",
        ),
        (
            InputFormat("conversational prompt-completion", task_prompt="[{task}] ", chat_template=TEMPLATE),
            Example(tuple(conversation(2)[:4]), ({"role": "assistant", "content": "ok"},)),
            conversation(2)[:4],
        ),
        (
            InputFormat("messages", task_prompt="[{task}] ", chat_template=TEMPLATE),
            Example(None, tuple(conversation(3)[:3])),
            conversation(3)[:2],
        ),
    ]
    for fmt, example, prompt in cases:
        ((ids, labels),) = encode_document(tokenizer, example, 512, "nb", None, fmt).chunks
        first_scored = next(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
        assert fmt.prompt_ids(tokenizer, prompt, "nb") == list(ids[:first_scored]), fmt.data_format


def test_conversational_run_generates_exports_and_scores_answers(chat_lm, tmp_path, capsys):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    rows = [
        {
            "task": t,
            "prompt": [{"role": "user", "content": f"say {i}"}],
            "completion": [{"role": "assistant", "content": f"{t}{i}"}],
        }
        for t in ("x", "y")
        for i in range(12)
    ]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = train_args_jsonl(data, run, "--chat-template", str(template), "--task-prompt", "[{task}] ")
    main(args)
    recorded = json.loads((run / "corpus.json").read_text())["input_format"]
    assert recorded["data_format"] == "conversational prompt-completion" and recorded["chat_template"] == TEMPLATE
    main(["evaluate", str(run), "--generate", "2", "--max-new-tokens", "3"])
    answers = pd.read_csv(run / "generation.csv")
    assert len(answers) == 2 and set(answers.task) == {"x", "y"}  # each task has one test example
    assert list(pd.read_csv(run / "generation_per_task.csv").columns) == ["task", "n", "chrf", "exact_match"]
    main(["export", str(run), "--out", str(tmp_path / "peft")])
    folder = tmp_path / "peft" / "x"
    served = json.loads((folder / "input_format.json").read_text())
    assert served["task_prompt_text"] == "[x] " and served["chat_template"] == TEMPLATE
    assert "library_name: peft" in (folder / "README.md").read_text()
    main(["train", "--resume", str(run)])  # a complete run (with the generation files) stays readable
    capsys.readouterr()
    main(["generate", str(run), "--task", "x", "--messages", '[{"role": "user", "content": "say 1"}]', "--greedy"])
    assert capsys.readouterr().out.strip() != ""
    assert main(["generate", str(run), "--task", "x", "--messages", "[{]"]) == 2
    assert "--messages: the 'messages' value is not valid JSON" in capsys.readouterr().err


def train_args_jsonl(data, out, *options):
    from .conftest import train_args

    args = train_args(data, out, *options)
    args[args.index(f"csv:{data}")] = f"jsonl:{data}"
    return args


def test_generation_scores_are_chrf_and_exact_match():
    examples = [("a", Example("p1", "the cat sat")), ("a", Example("p2", "on the mat")), ("b", Example("p3", "yes"))]
    perfect = score_generations(
        lambda prompts, tasks: [d.completion for _, d in examples if d.prompt in prompts], examples
    )
    assert perfect.chrf == pytest.approx(100) and perfect.exact_match == 1.0
    wrong = score_generations(lambda prompts, tasks: ["the cat sat", "nothing", "no"], examples, batch_size=3)
    assert wrong.exact_match == pytest.approx(1 / 3) and 0 < wrong.chrf < 100
    assert wrong.per_task.set_index("task").loc["a", "exact_match"] == 0.5
    assert [
        t for t, _ in heldout_examples(("a", "b"), [(0, examples[0][1]), (0, examples[1][1]), (1, examples[2][1])], 1)
    ] == ["a", "b"]
    with pytest.raises(ValueError, match="needs prompt-completion or messages data"):
        heldout_examples(("a",), [(0, "a text")], 1)


def test_a_corpus_of_only_tiny_tasks_trains_and_keeps_its_last_state(tmp_path, capsys, caplog):
    """No task can hold a document out: no validation (the last state is kept, not the untrained start) and no
    test score, each said in one line."""
    from .conftest import train_args

    path = tmp_path / "c.csv"
    pd.DataFrame([{"task": t, "text": f"{t} words {i}"} for t in "abc" for i in range(2)]).to_csv(path, index=False)
    with caplog.at_level("WARNING"):
        assert main(train_args(path, tmp_path / "run")) == 0
    assert "no validation documents" in caplog.text and "the last state is kept" in caplog.text
    out = capsys.readouterr().out
    assert "test perplexity: none (no task has test documents)" in out and "test: no held-out documents" in out
    adapters = bora_pyro.load_run(tmp_path / "run").rows([0, 1, 2])
    assert all(float(v.abs().sum()) > 0 for name, v in adapters.items() if name.endswith(".B"))  # B starts at 0
    table = pd.read_csv(tmp_path / "run" / "per_task.csv")
    assert table[["test_ppl", "test_ece", "test_brier"]].isna().all().all()


def test_a_run_keeps_the_chat_template_it_was_trained_with(tmp_path, capsys):
    """Editing or deleting the --chat-template file after training changes nothing: every command renders with
    the copy in the run folder; merged and PEFT exports carry it."""
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    rows = [{"task": "x", "messages": conversation(i)} for i in range(8)]
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    main(train_args_jsonl(data, run, "--chat-template", str(template), "--task-prompt", "[{task}] "))
    assert (run / "chat_template.jinja").read_text() == TEMPLATE
    template.write_text("{{ 'changed' }}")
    loaded = bora_pyro.load_run(run)
    assert loaded.corpus.input_format.chat_template == TEMPLATE
    assert main(["evaluate", str(run)]) == 0  # the corpus is unchanged: the template is the trained one
    template.unlink()
    assert main(["export", str(run), "--format", "merged", "--task", "x", "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())
    saved = config.get("chat_template") or (tmp_path / "merged" / "chat_template.jinja").read_text()
    assert saved == TEMPLATE
    assert json.loads((tmp_path / "merged" / "input_format.json").read_text())["task_prompt_text"] == "[x] "
    with pytest.raises(ValueError, match="prompts must be a list of message lists|has role None"):
        loaded.generate([[{"content": "no role"}]], ["x"])


def test_the_task_prompt_goes_into_the_first_user_message_never_a_scored_turn(chat_lm):
    _, tokenizer = chat_lm
    messages = (
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "Welcome"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "ans"},
    )
    fmt = InputFormat("messages", task_prompt="[{task}] ", chat_template=TEMPLATE)
    ((ids, labels),) = encode_document(tokenizer, Example(None, messages), 512, "T", None, fmt).chunks
    assert scored_text(tokenizer, ids, labels) == "Welcome<eos>\nans<eos>\n"
    assert "<|user|>[T] u" in tokenizer.decode(ids)
    assert fmt.task_text("global") == ""  # Theta was trained under no task prompt


def test_a_template_that_rewrites_turns_trains_on_everything_without_completion_only_loss(chat_lm):
    _, tokenizer = chat_lm
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages | length }}"
    rows = [{"task": "a", "messages": conversation(i)} for i in range(3)]
    corpus = bora_pyro.load_corpus(rows, tokenizer, completion_only_loss=False, split_column=None)
    ids, labels = corpus.train.input_ids[0], corpus.train.labels[0]
    assert list(labels[1:]) == list(ids[1:])  # every token but the first is scored


@pytest.mark.parametrize(
    "data, options, message",
    [
        (
            pd.DataFrame([["a", "x", "y"]] * 4, columns=["task", "text", "text"]),
            {},
            r"column\(s\) \['text'\] more than",
        ),
        ([{"task": "a", "text": "x"}] * 4, {"split_column": "fold"}, r"--split-column 'fold' is not a column"),
    ],
)
def test_python_tables_and_split_columns_are_checked(tiny_lm, data, options, message):
    with pytest.raises(ValueError, match=message):
        bora_pyro.load_corpus(data, tiny_lm[1], **options)


def test_evaluate_json_has_null_for_tasks_without_test_documents(tmp_path, capsys):
    from .conftest import train_args

    rows = [{"task": "big", "text": f"words {i}"} for i in range(12)] + [{"task": "one", "text": "alone"}]
    path = tmp_path / "c.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    main(train_args(path, tmp_path / "run"))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)  # strict JSON: no NaN
    assert [row["perplexity"] for row in out["per_task"] if row["task"] == "one"] == [None]
