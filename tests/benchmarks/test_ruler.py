"""The RULER-style generators: seeded, of exact length, answers in the haystack, scorers that can
say wrong. Run on the shipped tokenizer of the tiny fixtures (the real model's would need its
conversion; the generators only use the tokenizer's encode and decode)."""

import pytest

from benchmarks.tasks.ruler import TASK_NAMES, make_item, make_items

LENGTHS = (300, 517)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from retentivekv_vllm.fixtures import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def fixed(length):
    return lambda instruction, question: length


@pytest.mark.parametrize("length", LENGTHS)
def test_every_task_fills_exactly_the_length_asked_for(tokenizer, length):
    items = make_items(TASK_NAMES, 3, seed=1, tokenizer=tokenizer, context_tokens=fixed(length))
    assert sorted({item.task for item in items}) == sorted(TASK_NAMES)
    assert all(len(item.context_ids) == length for item in items)


def test_the_length_is_what_instruction_and_question_leave(tokenizer):
    def length(instruction, question):
        return 600 - len(instruction) // 4 - len(question) // 4

    for item in make_items(TASK_NAMES, 1, seed=2, tokenizer=tokenizer, context_tokens=length):
        assert len(item.context_ids) == length(item.instruction, item.question)


def test_items_are_seeded(tokenizer):
    def draw(seed):
        return make_items(TASK_NAMES, 2, seed=seed, tokenizer=tokenizer, context_tokens=fixed(400))

    assert draw(7) == draw(7)
    differ = [
        a.context_ids != b.context_ids or a.answers != b.answers for a, b in zip(draw(7), draw(8))
    ]
    assert all(differ)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_answers_are_in_the_haystack_and_the_scorer_needs_all_of_them(tokenizer, task):
    for item in make_items([task], 4, seed=3, tokenizer=tokenizer, context_tokens=fixed(450)):
        haystack = tokenizer.decode(list(item.context_ids))
        assert item.answers and all(answer in haystack for answer in item.answers), item
        assert item.answer_prefix and item.question.endswith("?") or task == "variable_tracking"
        right = f"{item.answer_prefix} " + ", ".join(reversed(item.answers))
        assert item.is_correct(right)
        assert item.is_correct(right.upper())  # case does not matter
        for missing in range(len(item.answers)):
            wrong = ", ".join(a for i, a in enumerate(item.answers) if i != missing)
            assert not item.is_correct(f"{item.answer_prefix} {wrong}")


def test_needle_tasks_ask_for_the_right_keys(tokenizer):
    rng_items = make_items(
        ["multikey", "multiquery", "multivalue"],
        4,
        seed=4,
        tokenizer=tokenizer,
        context_tokens=fixed(500),
    )
    for item in rng_items:
        haystack = tokenizer.decode(list(item.context_ids))
        keys = [w.strip(".") for w in haystack.split() if w.strip(".").isdigit() and len(w) >= 8]
        expected = {"multikey": (4, 1), "multiquery": (4, 2), "multivalue": (3, 3)}[item.task]
        assert (len(keys), len(item.answers)) == expected
        # The asked door is the one whose sentence holds the answer.
        for answer in item.answers:
            sentence = haystack[: haystack.index(answer)].rsplit("The pass key", 1)[-1]
            sentence = sentence.rsplit("One of the pass keys", 1)[-1]
            door = sentence.split(" of the ")[-1].split(" door")[0]
            assert door in item.question


def test_variable_chain_and_word_counts(tokenizer):
    (chain,) = make_items(
        ["variable_tracking"], 1, seed=5, tokenizer=tokenizer, context_tokens=fixed(400)
    )
    text = tokenizer.decode(list(chain.context_ids))
    value = chain.question.split()[-1].rstrip(".")
    first, second, third = chain.answers
    # The assignments appear in order, each naming the one before.
    assert text.index(f"VAR {first} = {value}") < text.index(f"VAR {second} = VAR {first}")
    assert text.index(f"VAR {second} = VAR {first}") < text.index(f"VAR {third} = VAR {second}")
    (common,) = make_items(
        ["common_words"], 1, seed=5, tokenizer=tokenizer, context_tokens=fixed(400)
    )
    words = [w for w in tokenizer.decode(list(common.context_ids)).split() if not w[0].isdigit()]
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    assert {w for _, w in counts[:3]} == set(common.answers) and counts[3][0] == 1
    (frequent,) = make_items(
        ["frequent_words"], 1, seed=5, tokenizer=tokenizer, context_tokens=fixed(400)
    )
    words = tokenizer.decode(list(frequent.context_ids)).split()
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    assert {w for _, w in counts[:3]} == set(frequent.answers)
    assert counts[2][0] > counts[3][0]  # no tie at the cut


def test_unknown_task_and_too_short_context_name_the_problem(tokenizer):
    import random

    with pytest.raises(ValueError, match="--tasks: unknown task 'nope'"):
        make_item("nope", tokenizer, random.Random(0), fixed(300))
    with pytest.raises(ValueError, match="too short"):
        make_item("multikey", tokenizer, random.Random(0), fixed(40))
