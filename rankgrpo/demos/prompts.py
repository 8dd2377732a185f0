"""Prompts sent to the black-box teacher during Remap-Reflect-Adjust (§2.2, App. A).

Every teacher backend (sandbox simulator, OpenAI-compatible endpoint, local HF model) is a
chat model: ``teacher.chat(messages) -> str``. Stage 1 sends it three kinds of prompt:

1. the recommendation prompt (``rankgrpo.data.build_prompt``), answered with N lines;
2. the metadata prompt below, answered in the Title (Year) / Keywords / Plots template;
3. the judge prompt below (Reflect), answered with "movie_name (release_year)####rating" lines.
"""
from __future__ import annotations

METADATA_TEMPLATE = "{title} ({year})\nKeywords: <comma-separated keywords>\nPlots: <one-paragraph plot summary>"

METADATA_PROMPT = (
    "Summarize the metadata for the movie {title} ({year}) based on the information in the format of:\n"
    + METADATA_TEMPLATE
    + "\nYou should separate the keywords with commas without numbering. The plot should be one paragraph."
)

JUDGE_PROMPT = (
    "Pretend you are a movie recommender system. I will give you a conversation between a user and you "
    "(a recommender system) as well as some movie candidates from our movie database. You need to rate each "
    "retrieved movie as recommendations into five levels based on the conversation: 2 (great), 1 (good), "
    "0 (normal), -1 (not good), -2 (bad). Here is the conversation: {context} Here are the movie candidates: "
    "{rec_titles}. You need to reply with the rating of each movie in a line, in the form of "
    "movie_name (release_year)####rating"
)


def build_metadata_prompt(title: str, year: int | None) -> str:
    """Remap's zero-shot metadata prompt for one item (App. A.1; known and out-of-catalog items)."""
    return METADATA_PROMPT.format(title=title, year=year if year is not None else "unknown year")


def build_judge_prompt(context: str, candidates: list[tuple[str, int]]) -> str:
    """Reflect's judge prompt (App. A.2): the conversation and the candidates, one per line."""
    rec_titles = "\n" + "\n".join(f"{t} ({y})" for t, y in candidates) + "\n"
    return JUDGE_PROMPT.format(context=context, rec_titles=rec_titles)
