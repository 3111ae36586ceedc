"""The zoo: domains and splits, the byte tokenizer, packing, method applicability, report."""

import dataclasses
import json
import random
import re

import numpy as np
import pytest

import jkarcher
from jkarcher.zoo import report
from jkarcher.zoo.distances import family_distances, tensor_family
from jkarcher.zoo.domains import (
    DOMAINS,
    domain,
    format_example,
    is_held_out,
    task_examples,
    text_lines,
)
from jkarcher.zoo.recipes import FAR, FINETUNE, ZOOS, base_mixture, expert_texts, recipe_record
from jkarcher.zoo.study import MergeRun, applicable, calibration_inputs, merge_pool
from jkarcher.zoo.tokenizer import BOS, byte_tokenizer
from jkarcher.zoo.training import packed_windows

TASKS = [d for d in DOMAINS if d.kind == "task"]


@pytest.mark.parametrize("task", TASKS, ids=lambda d: d.name)
def test_task_answers_are_right_and_splits_disjoint(task):
    train = task_examples(task, 300, "train", seed=0)
    held_out = task_examples(task, 40, "eval", seed=0)
    assert len({p for p, _ in held_out}) == 40
    assert not {p for p, _ in train} & {p for p, _ in held_out}
    assert all(not is_held_out(p) for p, _ in train) and all(is_held_out(p) for p, _ in held_out)
    assert task_examples(task, 40, "eval", seed=0) == held_out
    for prompt, answer in held_out:
        assert answer == _solve(task.name, prompt)


def test_at_most_gives_every_held_out_prompt_of_a_small_domain():
    """Multiplication has 101 held-out products of 2..24 x 2..24 (the split rule counted here
    from the definition); `at_most` gives all of them, its first 64 the usual 64, and without
    it asking for more is an error."""
    multiplication = domain("multiplication")
    every = {f"{a}*{b}" for a in range(2, 25) for b in range(2, 25) if is_held_out(f"{a}*{b}")}
    held_out = task_examples(multiplication, 1000, "eval", seed=0, at_most=True)
    assert {p for p, _ in held_out} == every and len(held_out) == len(every) == 101
    assert held_out[:64] == task_examples(multiplication, 64, "eval", seed=0)
    with pytest.raises(ValueError, match="fewer than 1000 distinct eval prompts"):
        task_examples(multiplication, 1000, "eval", seed=0)


def _solve(name: str, prompt: str) -> str:
    """Each task's answer computed independently of the generators."""
    if name in ("addition", "multiplication", "modulo"):
        return str(eval(prompt))  # digits and one operator
    words = prompt.split()
    if name == "reversal":
        return words[1][::-1]
    if name == "sorting":
        return "".join(sorted(words[1]))
    if name == "brackets":
        return "".join({"(": ")", "[": "]", "{": "}"}[c] for c in reversed(words[1]))
    if name == "counting":
        return str(words[2].count(words[1]))
    if name == "successor":
        return str(int(words[1]) + 1)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["code", "prose"])
def test_text_domains_split_whole_files(name):
    train, held_out = text_lines(name, "train"), text_lines(name, "eval")
    assert len(train) > 1000 and len(held_out) > 100
    assert all(line.strip() for line in held_out[:100])


def test_unknown_domain_is_an_error():
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        domain("poetry")


def test_byte_tokenizer_round_trips_any_text():
    tokenizer = byte_tokenizer()
    text = "12+34=46\n  def f(x): return 'é' {[()]}"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) == len(text.encode())
    assert tokenizer.decode(ids) == text
    assert tokenizer.get_vocab_size() == 259


def test_packed_windows_start_with_bos_and_keep_the_text():
    tokenizer = byte_tokenizer()
    texts = [format_example(f"{i}+1", str(i + 1)) for i in range(50)]
    windows = packed_windows(
        tokenizer, texts, seq_len=16, bos_id=tokenizer.token_to_id(BOS), seed=0
    )
    assert windows.shape[1] == 16 and np.all(windows[:, 0] == tokenizer.token_to_id(BOS))
    joined = "".join(tokenizer.decode(w[1:].tolist()) for w in windows)
    complete_lines = joined.split("\n")[:-1]  # the tail that did not fill a window is dropped
    assert set(complete_lines) <= {t.strip() for t in texts}
    assert len(complete_lines) >= len(texts) - 3


def test_applicability_follows_the_registry():
    assert applicable("karcher", 2) and applicable("karcher", 11)
    assert applicable("slerp", 2) and not applicable("slerp", 3)
    assert applicable("arcee_fusion", 2) and not applicable("arcee_fusion", 3)
    assert not applicable("model_stock", 2) and applicable("model_stock", 3)
    assert not applicable("passthrough", 2)
    assert applicable("karcher+fisher", 2) and applicable("fisher_merging", 5)


def test_only_rows_with_calibration_inputs_merge_with_them():
    assert calibration_inputs("karcher+fisher") == calibration_inputs("fisher_merging")
    assert calibration_inputs("fisher_merging") == ("fisher",)
    assert calibration_inputs("regmean") == ("gram",)
    assert not calibration_inputs("karcher") and not calibration_inputs("linear")
    rng = np.random.default_rng(0)
    pool = [{"w": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(3)]
    fishers = [{"w": np.exp(rng.normal(size=(4, 8))).astype(np.float32)} for _ in range(3)]
    grams = [{"w": np.diag(np.exp(rng.normal(size=8))).astype(np.float32)} for _ in range(3)]
    statistics = {"fisher": fishers, "gram": grams}
    plain = merge_pool(pool, "karcher", 3, 0, statistics)["w"]
    np.testing.assert_array_equal(plain, jkarcher.merge(pool)["w"])
    regmean = merge_pool(pool, "regmean", 3, 0, statistics)["w"]
    np.testing.assert_array_equal(regmean, jkarcher.merge(pool, method="regmean", gram=grams)["w"])
    preconditioned = merge_pool(pool, "karcher+fisher", 3, 0, statistics)["w"]
    np.testing.assert_array_equal(preconditioned, jkarcher.merge(pool, fisher=fishers)["w"])
    assert np.abs(np.asarray(plain) - np.asarray(preconditioned)).max() > 1e-3


def _runs():
    rng = random.Random(0)
    scores = lambda: {d.name: rng.random() for d in DOMAINS}
    runs = [MergeRun(m, n, scores(), scores(), 1.0) for m in ("karcher", "linear") for n in (2, 3)]
    return runs


def test_average_table_bolds_the_best_of_each_column():
    runs = _runs()
    table = report.average_table(runs)
    for n in (2, 3):
        best = max((r for r in runs if r.n_models == n), key=lambda r: r.average)
        assert f"**{best.average:.3f}**" in table
    assert table.splitlines()[0] == "| method | N=2 | N=3 |"


def test_findings_name_the_winner_of_every_column():
    runs = _runs()
    text = " ".join(report.findings(runs))
    for n in (2, 3):
        best = max((r for r in runs if r.n_models == n), key=lambda r: r.average)
        if best.method == "karcher":
            assert "best average score at N = " in text
        else:
            assert f"N={n} (linear {best.average:.3f}" in text


def test_variant_and_reference_findings_state_the_measured_differences():
    scores = lambda value: {d.name: value for d in DOMAINS}
    runs = [
        MergeRun("karcher", 2, scores(0.30), scores(2.0), 1.0),
        MergeRun("karcher", 3, scores(0.20), scores(2.0), 1.0),
        MergeRun("karcher+fisher", 2, scores(0.35), scores(2.0), 1.0),
        MergeRun("karcher+fisher", 3, scores(0.15), scores(2.0), 1.0),
    ]
    (variant,) = report.variant_findings(runs, {"karcher+fisher": "karcher"})
    assert variant == (
        "karcher+fisher against karcher: the average changes by +0.050 at N=2, -0.050 at N=3 "
        "(mean +0.000; higher at 1 of 2)."
    )
    assert report.variant_findings(runs, {"ties+fisher": "ties"}) == []
    (reference,) = report.reference_findings(runs, base_average=0.32)
    assert "averages 0.320; the best merge exceeds it at N = 2 " in reference
    assert "exceeds it at no N" in report.reference_findings(runs, base_average=0.5)[0]


def test_readme_section_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\noutro\n")
    report.update_readme(readme, "new table")
    assert readme.read_text() == (
        f"intro\n{report.README_BEGIN}\nnew table\n{report.README_END}\noutro\n"
    )
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(ValueError, match="no study markers"):
        report.update_readme(tmp_path / "plain.md", "x")


def test_a_saved_recipe_compares_equal_so_the_zoo_is_reused():
    for recipe in ZOOS.values():
        assert json.loads(json.dumps({"record": recipe_record(recipe)}))["record"] == (
            recipe_record(recipe)
        )
    assert len({json.dumps(recipe_record(r)) for r in ZOOS.values()}) == len(ZOOS)


def _small(recipe, **changes):
    return dataclasses.replace(recipe, examples_per_domain=200, **changes)


TASK_TEXT = {
    "addition": r"\d+\+\d+=\d+\n",
    "multiplication": r"\d+\*\d+=\d+\n",
    "modulo": r"\d+%\d+=\d+\n",
    "reversal": r"rev [a-j]+=[a-j]+\n",
    "sorting": r"sort \d+=\d+\n",
    "brackets": r"close [(\[{]+=[)\]}]+\n",
    "counting": r"count [abc] [abc]+=\d+\n",
    "successor": r"next \d+=\d+\n",
}


def _count(texts, task: str) -> int:
    return sum(re.fullmatch(TASK_TEXT[task], t) is not None for t in texts)


def test_the_finetune_base_sees_a_little_of_each_task_and_all_of_the_text():
    recipe = _small(FINETUNE, base_examples_per_task=10)
    texts = base_mixture(recipe, recipe.seed)
    assert len(texts) == 10 * len(TASKS) + 200 * (len(DOMAINS) - len(TASKS))
    assert {t.name: _count(texts, t.name) for t in TASKS} == {t.name: 10 for t in TASKS}
    far = _small(FAR)
    far_texts = base_mixture(far, far.seed)
    assert {t.name: _count(far_texts, t.name) for t in TASKS} == {t.name: 200 for t in TASKS}


def test_an_expert_mixes_in_its_share_of_general_data():
    recipe = _small(FINETUNE)
    expert = next(e for e in recipe.experts if e.domain == "reversal")
    assert expert.general_share == 0.5
    texts = expert_texts(recipe, expert)
    assert len(texts) == 400
    general = texts[200:]
    assert _count(texts[:200], "reversal") == 200
    assert sum(_count(general, t.name) for t in TASKS) < len(general)  # text lines among them
    assert expert_texts(recipe, expert) == texts
    other_seed = dataclasses.replace(recipe, expert_seed=1)
    assert expert_texts(other_seed, expert) != texts
    assert base_mixture(other_seed, other_seed.seed) == base_mixture(recipe, recipe.seed)
    far = _small(FAR)
    alone = expert_texts(far, far.experts[0])
    assert len(alone) == 200 and _count(alone, far.experts[0].domain) == 200


def test_family_distances_against_the_definitions():
    rng = np.random.default_rng(0)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"]
    names.append("model.layers.1.mlp.up_proj.weight")
    assert [tensor_family(n) for n in names] == ["embed_tokens.weight"] + ["mlp.up_proj.weight"] * 2
    base = {n: rng.normal(size=(3, 4)) for n in names}
    deltas = [{n: 0.1 * rng.normal(size=(3, 4)) for n in names} for _ in range(3)]
    experts = [{n: base[n] + d[n] for n in names} for d in deltas]
    rows = family_distances(base, experts)
    assert list(rows) == ["embed_tokens.weight", "mlp.up_proj.weight"]
    mlp = names[1:]
    flat = lambda tensors: np.concatenate([tensors[n].ravel() for n in mlp])
    norms = [np.linalg.norm(flat(d)) for d in deltas]
    assert rows["mlp.up_proj.weight"]["relative_norm"] == pytest.approx(
        np.mean(norms) / np.linalg.norm(flat(base)), rel=1e-12
    )
    cosine = flat(deltas[0]) @ flat(deltas[2]) / (norms[0] * norms[2])
    one_pair = family_distances(base, [experts[0], experts[2]])["mlp.up_proj.weight"]
    assert one_pair["task_angle"] == pytest.approx(np.degrees(np.arccos(cosine)), rel=1e-12)
    same = family_distances(base, [experts[0], experts[0]])["embed_tokens.weight"]
    assert same["task_angle"] == pytest.approx(0.0, abs=1e-5)
    assert same["weight_angle"] == pytest.approx(0.0, abs=1e-5)


def test_expert_table_compares_each_expert_with_the_base():
    names = [d.name for d in DOMAINS]
    base = {d: {"score": 0.5, "perplexity": 3.0} for d in names}
    expert = base | {
        "addition": {"score": 0.9, "perplexity": 2.0},
        "multiplication": {"score": 0.44, "perplexity": 3.5},
        "modulo": {"score": 0.46, "perplexity": 3.1},
    }
    second_seed = {"base": base, "expert-addition": expert | {"addition": {"score": 0.45}}}
    per_seed = [{"base": base, "expert-addition": expert}, second_seed]
    mean = {"base": base, "expert-addition": expert}  # the means, as the caller gives them
    table = report.expert_table(mean, per_seed).splitlines()
    assert len(table) == 3
    average = (0.9 + 0.44 + 0.46 + 0.5 * 7) / 10
    assert table[2] == (
        f"| expert-addition | 0.900 / 0.500 | +0.400, -0.050 | 2.000 / 3.000 | "
        f"{average:.3f} / 0.500 | 8 of 9 |"
    )
