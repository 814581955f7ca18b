"""moejax.downstream on the task files in tests/data/tasks (HellaSwag, PIQA, ARC and generic rows written for
these tests): parsing with lm-eval's prompts, log-likelihoods against a direct computation, accuracies and
their intervals, errors, the command line."""
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from moejax import downstream as DS
from moejax import model as M
from moejax import model_config as mc
from moejax.tokenizer import ByteTokenizer

TASKS = pathlib.Path(__file__).parent / "data" / "tasks"
V, D = 384, 32


def test_each_format_reads_with_lm_eval_prompts():
    hs = DS.read_task(str(TASKS / "hellaswag.jsonl"))
    assert hs[0].context == "Making tea: A woman fills a kettle with water and sets it on the stove. She"
    assert hs[0].choices[0] == " waits for the water to boil and pours it over a tea bag in a cup."
    assert hs[0].choices[1] == " throws the kettle out of the window. and drives away."  # ' [title]' -> '. '
    assert hs[1].context == "Home and Garden: How to water a houseplant. Check the soil."  # [header] dropped
    assert hs[1].choices[3] == "  Sing to the soil."  # lm-eval drops "[step]" and keeps the space after it
    assert hs[2].label == 1  # label given as a string
    piqa = DS.read_task(str(TASKS / "piqa.jsonl"))
    assert piqa[1].context == "Question: How do you keep bread fresh for longer?\nAnswer:"
    assert piqa[1].choices == (" Leave it open on the counter.", " Store it in a closed bag.") and piqa[1].label == 1
    arc = DS.read_task(str(TASKS / "arc.jsonl"))
    assert [a.label for a in arc] == [0, 1, 2] and arc[2].choices[2] == " 0"
    assert len(DS.read_task(str(TASKS / "generic.jsonl"), limit=1)) == 1


def small_model(seed=0):
    c = mc.ModelConfig(V, D, 2, 4, mc.deepseekmoe(D, 64, n_experts=4), n_kv_heads=2)
    return M.Transformer(c, rngs=nnx.Rngs(seed))


def test_loglikelihoods_equal_a_direct_sum_over_the_choice_tokens():
    """Each score is sum_t log p(token t | EOS + context + choice[:t]) from one unpadded forward pass of that
    sequence alone; batching, bucketing and padding change nothing."""
    model, tok = small_model(), ByteTokenizer()
    examples = DS.read_task(str(TASKS / "piqa.jsonl")) + DS.read_task(str(TASKS / "arc.jsonl"))
    scores = DS.loglikelihoods(model, tok, examples, batch_size=4)
    alone = DS.loglikelihoods(model, tok, examples[:1], batch_size=1)
    np.testing.assert_allclose(alone[0], scores[0], atol=1e-4)
    forward = jax.jit(lambda t: jax.nn.log_softmax(model(t)[0][0], -1))  # one sequence, right-padded to 128
    for ex, s in zip(examples, scores):
        for choice, got in zip(ex.choices, s):
            ctx, cont = list(tok.encode(ex.context)), list(tok.encode(choice))
            seq = np.asarray([tok.eos_id] + ctx + cont)
            logp = np.asarray(forward(np.pad(seq[:-1], (0, 128 - len(seq) + 1))[None]))
            ref = sum(logp[len(ctx) + i, cont[i]] for i in range(len(cont)))
            assert got == pytest.approx(ref, abs=1e-3)


def test_accuracy_normalises_by_bytes_and_gives_wilson_intervals():
    examples = [DS.Example("c", (" a", " bbbb"), 1), DS.Example("c", (" a", " bbbb"), 0)]
    scores = [np.array([-2.0, -3.0]), np.array([-2.0, -3.0])]  # per byte: -1.0 vs -0.6
    r = DS.accuracy(examples, scores)
    assert (r["acc"], r["acc_norm"], r["n"], r["correct"]) == (0.5, 0.5, 2, [0, 1])
    lo, hi = DS.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)  # Wilson (1927) for 8 of 10
    assert DS.wilson(0, 0) == (0.0, 1.0)


def test_bad_task_files_and_specs_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "label": 2}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1 has label 2 and 2 choices"):
        DS.read_task(str(bad))
    bad.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1 is not a auto task row.*matches no format"):
        DS.read_task(str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DS.read_task(str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="NAME:PATH"):
        DS.parse_tasks(["piqa"])


def test_command_line_reports_each_task(tmp_path, capsys):
    from moejax import convert

    c = mc.ModelConfig(V, D, 2, 4, mc.gshard(D, 64, n_experts=4))  # capacity routing: dropless at evaluation
    experiment, trainer = convert.model_workdir_config(c, "byte")
    state = trainer.init()
    convert.save_model(str(tmp_path / "w"), experiment, trainer, {k: state[k] for k in ("params", "rest")},
                       {"note": "random weights"})
    out = tmp_path / "r.json"
    DS.main(["--workdir", str(tmp_path / "w"), "--task", f"piqa:{TASKS / 'piqa.jsonl'}",
             "--task", f"hellaswag:{TASKS / 'hellaswag.jsonl'}", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "piqa" in printed and "hellaswag" in printed
    res = json.loads(out.read_text())["tasks"]
    assert res["piqa"]["n"] == 3 and res["hellaswag"]["n"] == 3 and 0 <= res["piqa"]["acc"] <= 1
