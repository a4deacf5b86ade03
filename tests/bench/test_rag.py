"""bench/rag.py's corpus and its retrieval ceiling."""

from rag import retrieval_ceiling, story_questions


def test_the_corpus_stories_are_distinct_held_out_story_questions():
    items = story_questions(50, seed=3)
    assert len({story for _, story, _ in items}) == 50
    assert all(prompt.endswith(f"\nQuestion: {question}") and story in prompt for prompt, story, question in items)


def test_the_ceiling_counts_the_stories_a_question_fits():
    prefix = "Read the story and answer the question.\nStory: "
    stories = ["Mia went to the lake.", "Mia went to the park.", "Tom went to the river.", "Mia felt happy."]
    items = [(f"{prefix}{s}\nQuestion: {q}", s, q) for s, q in zip(stories, ["Where did Mia go?"] * 2 + [
        "Where did Tom go?", "How did Mia feel?"])]
    # Two stories say where Mia went; one where Tom went; one how Mia felt.
    ceiling = retrieval_ceiling(items, items)
    assert ceiling == {"recall@1": (0.5 + 0.5 + 1 + 1) / 4, "recall@5": 1.0}
