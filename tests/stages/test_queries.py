import pytest

from prism.stages.queries import NearDuplicateFilter, clean_query, query_status


@pytest.mark.parametrize("raw, expected", [
    ("How do I write a sonnet about the sea?\nSecond line", "How do I write a sonnet about the sea?"),
    ("1. What is the boiling point of water at altitude?", "What is the boiling point of water at altitude?"),
    ("A user might ask:\n\n\"How can I review a pull request well?\"", "How can I review a pull request well?"),
    ('A user might ask: "What makes a villain believable?" and more', "What makes a villain believable?"),
    ("Question: Why is the sky blue?", "Why is the sky blue?"),
    ("- **Explain quicksort simply**", "Explain quicksort simply"),
    ("\n\n", ""),
])
def test_clean_query(raw, expected):
    assert clean_query(raw) == expected


def test_near_duplicates_are_dropped_at_rouge_l_threshold():
    dedup = NearDuplicateFilter(0.7, ["How do I write a poem about the sea?"])
    assert dedup.is_duplicate("How do I write a poem about the ocean?")
    assert not dedup.is_duplicate("What is the capital of Australia?")


def test_query_status_rules():
    dedup = NearDuplicateFilter(0.7, ["Explain how vaccines train the immune system."])
    assert query_status("Too short?", 15, dedup, 0, 4) == "too_short"
    assert query_status("Explain how vaccines train the immune system!", 15, dedup, 0, 4) == "duplicate"
    assert query_status("What is a good first programming language?", 15, dedup, 4, 4) == "surplus"
    assert query_status("What is a good first programming language?", 15, dedup, 3, 4) == "kept"
