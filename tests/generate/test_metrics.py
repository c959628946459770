"""ROUGE, exact match, perplexity and lengths on examples computed by hand."""

from __future__ import annotations

import math

import pytest

from mlx_qlora.generate.metrics import (
    exact_match, mean, normalize_answer, perplexity, rouge_scores, text_scores,
)


def test_rouge_one_word_substituted():
    # reference 6 words, prediction 6 words, one differs ("sat" -> "lay"):
    # unigrams in common 5 (the x2, cat, on, mat) -> P = R = F = 5/6
    # bigrams: 5 each, in common the-cat, on-the, the-mat -> 3/5
    # longest common subsequence "the cat on the mat" -> 5/6
    [s] = rouge_scores(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx(5 / 6)
    assert s["rouge2"] == pytest.approx(3 / 5)
    assert s["rougeL"] == pytest.approx(5 / 6)


def test_rouge_shorter_prediction_uses_the_f_measure():
    # reference 5 words, prediction its middle 3: P = 1, R = 3/5 -> F = 2 * 0.6 / 1.6 = 0.75
    # bigrams: P = 2/2, R = 2/4 -> F = 2/3; LCS 3 -> the same 0.75 as unigrams
    [s] = rouge_scores(["quick brown fox"], ["the quick brown fox jumps"])
    assert s["rouge1"] == pytest.approx(0.75)
    assert s["rouge2"] == pytest.approx(2 / 3)
    assert s["rougeL"] == pytest.approx(0.75)


def test_rouge_word_order_case_and_punctuation():
    # the same six words (case and the full stop do not count) in another order:
    # unigrams 6/6; bigrams in common the-capital, capital-of, of-france -> 3/5;
    # LCS "the capital of france" -> 4/6
    [s] = rouge_scores(["The capital of France is Paris"], ["Paris is the capital of France."])
    assert s["rouge1"] == pytest.approx(1.0)
    assert s["rouge2"] == pytest.approx(0.6)
    assert s["rougeL"] == pytest.approx(4 / 6)


def test_rouge_of_an_empty_prediction_is_zero():
    [s] = rouge_scores([""], ["something"])
    assert s == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_needs_as_many_predictions_as_references():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  An   apple,\ta pear ", "apple pear"),
        ("theatre of the absurd", "theatre of absurd"),  # articles only as whole words
        ("Paris, France.", "paris france"),
        ("A", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("The Eiffel Tower!", "eiffel   tower", 1.0),
        ("an apple", "Apple.", 1.0),
        ("Paris is the capital", "paris is capital", 1.0),
        ("42", "forty-two", 0.0),
        ("capital of France is Paris", "Paris is capital of France", 0.0),
    ],
)
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


def test_text_scores_are_means_over_examples():
    predictions = ["the cat lay on the mat", "Eiffel Tower", "quick brown fox"]
    references = ["the cat sat on the mat", "the eiffel tower.", "the quick brown fox jumps"]
    scores = text_scores(predictions, references, lengths=[7, 3, 5])
    # "Eiffel Tower" against "the eiffel tower.": unigrams P = 1, R = 2/3 -> F = 0.8; bigrams P = 1, R = 1/2 -> 2/3
    assert scores["rouge1"] == pytest.approx((5 / 6 + 0.8 + 0.75) / 3)
    assert scores["rouge2"] == pytest.approx((3 / 5 + 2 / 3 + 2 / 3) / 3)
    assert scores["rougeL"] == pytest.approx((5 / 6 + 0.8 + 0.75) / 3)
    assert scores["exact_match"] == pytest.approx(1 / 3)  # only the Eiffel Tower matches after normalisation
    assert scores["mean_length"] == pytest.approx(5.0)


def test_perplexity_and_mean():
    assert perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    assert math.isnan(perplexity(0.0, 0))
    assert mean([]) == 0.0
    assert mean([1.0, 2.0]) == 1.5


# ---- evaluate.py end to end on the tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_setup(tiny_hf_checkpoint, tiny_spm_path, tmp_path_factory):
    """The tiny model with a tokenizer, a prepared sample split, and hand-made adapters."""
    import shutil
    from pathlib import Path

    from mlx_qlora.config import DataConfig
    from mlx_qlora.data.prepare import prepare_dataset
    from mlx_qlora.model import load_model

    from support import write_adapters

    root = tmp_path_factory.mktemp("eval")
    model_dir = root / "tiny"
    shutil.copytree(tiny_hf_checkpoint, model_dir)
    shutil.copy(tiny_spm_path, model_dir / "tokenizer.model")
    sample = Path(__file__).resolve().parents[2] / "data" / "sample" / "dolly_sample.jsonl"
    prepare_dataset(sample, model_dir, root / "data", DataConfig(max_seq_len=256, val_fraction=0.1))
    adapters = write_adapters(root / "run", load_model(model_dir).args, template="dolly")
    return model_dir, root / "data", adapters, root


def _reference_losses(model, examples):
    """Teacher-forced cross-entropy sum and count per example, with torch."""
    import torch

    out = []
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor(e["input_ids"][None].astype("int64"))).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:].astype("int64"))
            loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            out.append((float(loss), int((labels != -100).sum())))
    return out


def test_evaluate_base_and_tuned(eval_setup):
    import json

    import torch
    import transformers
    from peft import PeftModel

    from mlx_qlora.data.dataset import PreparedDataset
    from mlx_qlora.data.tokenizer import load_tokenizer
    from mlx_qlora.generate.evaluate import evaluate
    from mlx_qlora.generate.generator import generate
    from mlx_qlora.model import load_model

    model_dir, data_dir, adapters, root = eval_setup
    results = evaluate(model_dir, data_dir, root / "eval", adapter_path=adapters, max_examples=6, max_tokens=8,
                       batch_size=4, progress=False, log=lambda line: None)
    lines = [json.loads(line) for line in (root / "eval" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == results["examples"] == 6
    assert json.loads((root / "eval" / "results.json").read_text())["overall"] == results["overall"]
    assert "| ROUGE-L |" in (root / "eval" / "results.md").read_text()

    # prompt = leading -100 labels, reference = learned tokens without EOS; base answers = greedy one by one
    tokenizer = load_tokenizer(model_dir)
    data = PreparedDataset(data_dir, "validation")
    model = load_model(model_dir)
    examples = [data[i] for i in range(6)]
    for line, e in zip(lines, examples):
        n_prompt = int((e["labels"] != -100).argmax())
        assert line["prompt"] == tokenizer.decode(e["input_ids"][:n_prompt])
        learned = e["input_ids"][e["labels"] != -100]
        if learned[-1] == tokenizer.eos_id:  # (a response cut to fit max_seq_len has no EOS)
            learned = learned[:-1]
        assert line["reference"] == tokenizer.decode(learned).strip()
        assert line["category"] == data.category_names[e["category"]]
        alone = generate(model, tokenizer, e["input_ids"][:n_prompt].tolist(), max_tokens=8)
        assert line["base"] == alone.text.strip() and line["base_tokens"] == len(alone.tokens)

    # text scores are the means of the per-example metrics
    base = results["overall"]["base"]
    assert base["rougeL"] == pytest.approx(mean([rouge_scores([x["base"]], [x["reference"]])[0]["rougeL"] for x in lines]))
    assert base["exact_match"] == pytest.approx(mean([exact_match(x["base"], x["reference"]) for x in lines]))
    assert base["mean_length"] == pytest.approx(mean([x["base_tokens"] for x in lines]))
    assert base["examples"] == 6 and sum(c["base"]["examples"] for c in results["categories"].values()) == 6

    # perplexity against transformers (base) and PEFT (tuned)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = _reference_losses(reference, examples)
    assert base["perplexity"] == pytest.approx(
        math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums)), rel=1e-4)
    tuned = PeftModel.from_pretrained(reference, adapters).eval()
    sums = _reference_losses(tuned, examples)
    assert results["overall"]["tuned"]["perplexity"] == pytest.approx(
        math.exp(sum(s for s, _ in sums) / sum(n for _, n in sums)), rel=1e-4)
    assert results["overall"]["tuned"]["perplexity"] != pytest.approx(base["perplexity"], rel=1e-3)


def test_evaluate_script(eval_setup):
    import subprocess
    import sys
    from pathlib import Path

    model_dir, data_dir, adapters, root = eval_setup
    script = Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(model_dir), "--data", str(data_dir),
                           "--max-examples", "2", "--max-tokens", "4", "--out", str(root / "eval-base"),
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| metric | base |" in proc.stdout and "tuned" not in proc.stdout
    proc = subprocess.run([sys.executable, str(script), "--model", str(model_dir), "--data", str(data_dir),
                           "--split", "test", "--out", str(root / "x")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no 'test' split" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("max_examples", [0, -1])
def test_evaluate_refuses_max_examples_below_one_before_loading(max_examples, tmp_path):
    """-1 used to select no example and write NaN means into results.json."""
    from mlx_qlora.errors import UserError
    from mlx_qlora.generate.evaluate import evaluate, load_examples

    with pytest.raises(UserError, match=f"max_examples must be >= 1 .*got {max_examples}"):
        evaluate(tmp_path / "no-model", tmp_path / "no-data", tmp_path / "eval", max_examples=max_examples)
    with pytest.raises(UserError, match="max_examples must be >= 1"):
        load_examples(tmp_path / "no-data", max_examples=max_examples)
    assert list(tmp_path.iterdir()) == []
