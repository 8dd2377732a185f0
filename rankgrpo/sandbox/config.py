"""The two configs of the sandbox: the world (``SandboxConfig``) and the simulated teacher
(``TeacherConfig``). Every field is documented; the command line is derived from them."""
from __future__ import annotations

from dataclasses import dataclass

from rankgrpo.config import arg


@dataclass
class SandboxConfig:
    """Everything that defines a sandbox world. Same config -> byte-identical data files."""

    seed: int = arg(0, "Seed of the whole world (catalog, users, conversations, model init).")

    # ---- catalog
    n_films: int = arg(3000, "Number of films in the catalog (sequels and remakes included).")
    sequel_rate: float = arg(0.06, "Share of films that are sequels of an earlier film (same genres, "
                                   "numbered or subtitled title).")
    remake_rate: float = arg(0.015, "Share of films that remake an earlier film: same title, a later year, "
                                    "so only the year tells them apart.")

    # ---- conversations and splits
    n_train: int = arg(20000, "Number of training samples (records of train.jsonl).")
    n_validation: int = arg(1000, "Number of validation samples.")
    n_test: int = arg(1000, "Number of test samples.")
    multi_response_rate: float = arg(0.1, "Share of conversations with a second sample: another responder's "
                                          "ground truth for the same conversation (as in Reddit-v2).")
    start_year: float = arg(2020.0, "Simulated time of the first conversation (fractional year). Train, "
                                    "validation and test follow each other in time.")
    end_year: float = arg(2025.0, "Simulated time of the last conversation (fractional year). Films released "
                                  "after a conversation's year can not be in its ground truth.")
    max_seen: int = arg(3, "At most this many films mentioned by the user (0 to max_seen).")
    max_groundtruth: int = arg(8, "Ground truth size is drawn from 1..max_groundtruth (small sizes likelier).")
    multi_turn_rate: float = arg(0.3, "Share of conversations with a SYSTEM turn proposing a film and a USER reply.")
    reveal_rate: float = arg(0.85, "Probability that each part of the latent taste (genres, era, director, "
                                   "keywords) is put into words in the conversation.")

    # ---- latent taste
    second_genre_rate: float = arg(0.45, "Probability that a taste has a second genre.")
    era_rate: float = arg(0.65, "Probability that a taste has a preferred era.")
    era_width: float = arg(7.0, "Width (years, one standard deviation) of a preferred era.")
    director_rate: float = arg(0.2, "Probability that a taste names a favourite director.")
    keyword_rate: float = arg(0.45, "Probability that a taste has one or two favourite plot keywords.")

    # ---- latent relevance s(u, f) = sum of the terms below; ground truth ~ softmax(s / temperature)
    genre_weight: float = arg(3.0, "Weight of genre overlap (first taste genre counts 1, second 0.6).")
    era_weight: float = arg(2.0, "Weight of closeness to the preferred era (Gaussian of width era_width).")
    director_weight: float = arg(2.5, "Weight of the favourite director.")
    keyword_weight: float = arg(1.5, "Weight of each shared favourite keyword.")
    popularity_weight: float = arg(0.8, "Weight of the film's standardised log popularity.")
    recency_weight: float = arg(0.6, "Weight of recency at the time of the conversation (exp(-age / 3 years)).")
    temperature: float = arg(0.6, "Softmax temperature of ground-truth sampling: higher is noisier, and the "
                                  "oracle's recall drops.")

    # ---- tokenizer and base model
    build_model: bool = arg(True, "Also train the tokenizer and write the random base model (DIR/base_model).")
    vocab_size: int = arg(4096, "Byte-level BPE vocabulary size (special tokens included).")
    title_tokens: bool = arg(False, "Give every catalog title one token and every release year ' (YYYY)' one "
                                    "token (on top of the BPE vocabulary): a list line costs 3 tokens instead "
                                    "of about 13, and a title named in a conversation is the token the list "
                                    "uses. What makes a student learnable in minutes on a CPU.")
    hidden_size: int = arg(192, "Base model hidden size.")
    num_layers: int = arg(4, "Base model decoder layers.")
    num_heads: int = arg(4, "Base model attention heads.")
    num_kv_heads: int = arg(2, "Base model key/value heads (grouped-query attention).")
    intermediate_size: int = arg(512, "Base model MLP width.")
    max_position_embeddings: int = arg(2048, "Base model context length.")
    tie_embeddings: bool = arg(True, "Tie the output head to the input embeddings (as Qwen2-0.5B does). "
                                     "--no-tie-embeddings gives the head its own vocab x hidden matrix: more "
                                     "parameters at the same compute, and a head free to score 'like the film "
                                     "just listed' without scoring that film itself.")

    # ---- knowledge pretraining of the base model (rankgrpo/sandbox/pretrain.py)
    pretrain_steps: int = arg(0, "Causal-LM steps on text the world writes about its films (facts and "
                                 "'people who liked A also liked B' sentences) before the base model is saved; "
                                 "0 leaves it random.")
    pretrain_lr: float = arg(3e-3, "Peak learning rate of knowledge pretraining (5% warm-up, cosine to 0).")
    pretrain_batch_size: int = arg(16, "Blocks per knowledge-pretraining step.")
    pretrain_seq_len: int = arg(128, "Tokens per packed knowledge-pretraining block.")
    pretrain_fact_renderings: int = arg(8, "Fact paragraphs per film in the pretraining corpus (each worded anew).")
    pretrain_co_preference: int = arg(20000, "Co-preference sentences in the pretraining corpus, each from a "
                                             "fresh taste drawn from the world's taste model.")
    pretrain_catalog_lists: bool = arg(False, "Also pretrain on catalog lists written one 'Title (Year)' a line "
                                              "(each director's films; the most watched films of each genre and "
                                              "decade): reference facts, not answers to any conversation.")
    pretrain_chat_questions: int = arg(0, "Also pretrain on this many chat turns in which a user asks for films by "
                                          "director, genre (and decade) or plot keyword and the assistant lists "
                                          "them from the catalog, one 'Title (Year)' a line: the instruction "
                                          "tuning that lets a chat model answer zero-shot. 0: none.")

    def validate(self) -> None:
        if self.n_films < 200:
            raise ValueError("n_films must be at least 200")
        if min(self.n_train, self.n_validation, self.n_test) < 1:
            raise ValueError("every split needs at least one sample")
        if not self.start_year < self.end_year:
            raise ValueError("start_year must be before end_year")
        if self.max_groundtruth < 1 or self.max_seen < 0:
            raise ValueError("max_groundtruth must be >= 1 and max_seen >= 0")
        for name in ("sequel_rate", "remake_rate", "multi_response_rate", "multi_turn_rate", "reveal_rate",
                     "second_genre_rate", "era_rate", "director_rate", "keyword_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.sequel_rate + self.remake_rate > 0.5:
            raise ValueError("sequel_rate + remake_rate must be at most 0.5")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if min(self.pretrain_steps, self.pretrain_co_preference, self.pretrain_chat_questions, self.pretrain_lr) < 0:
            raise ValueError("pretrain_steps, pretrain_co_preference, pretrain_chat_questions and pretrain_lr must be "
                             ">= 0")
        if self.pretrain_steps and min(self.pretrain_batch_size, self.pretrain_seq_len,
                                       self.pretrain_fact_renderings) < 1:
            raise ValueError("pretrain_batch_size, pretrain_seq_len and pretrain_fact_renderings must be >= 1")
        if self.pretrain_steps and not self.build_model:
            raise ValueError("pretrain_steps needs build_model")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")


@dataclass
class TeacherConfig:
    """The simulated black-box teacher: its knowledge and its failure modes (§2.2)."""

    seed: int = arg(0, "Seed of the teacher's own noise (its item biases, slips and ratings).")
    ooc_rate: float = arg(0.25, "Average share of listed items that are out of catalog: invented titles, "
                                "misspellings, wrong years. It grows toward the tail: at rank k (0-based) of N "
                                "the rate is ooc_rate * (0.5 + k / (N - 1)).")
    ooc_mix: tuple[float, ...] = arg((0.4, 0.35, 0.25), "Relative shares of the out-of-catalog kinds "
                                                         "(invented, misspelled, wrong year).")
    format_slip_rate: float = arg(0.06, "Share of lines with a format slip: numbering, bold, quotes, extra "
                                        "words, a missing year or a year in brackets.")
    popularity_bias: float = arg(1.0, "Extra weight the teacher gives to standardised log popularity.")
    item_bias: float = arg(0.5, "Std of a fixed per-film bias in the teacher's taste (what Adjust can learn).")
    knowledge_noise: float = arg(0.8, "Std of the teacher's per-conversation error in judging relevance.")
    tail_noise: float = arg(0.5, "Probability, at the last rank, of listing a loosely related film instead of "
                                 "the next best; grows linearly from 0 at rank 0.")
    judge_noise: float = arg(0.6, "Std of the judge's rating noise, in rating steps (a step is a 4x change "
                                  "of the candidate's rank in the teacher's belief).")
    judge_slip_rate: float = arg(0.03, "Share of candidates whose rating line is missing or malformed.")
    metadata_noise: float = arg(0.15, "Share of keywords the teacher gets wrong when describing a film it knows "
                                      "(twice as many for films it made up).")

    def validate(self) -> None:
        for name in ("ooc_rate", "format_slip_rate", "tail_noise", "judge_slip_rate", "metadata_noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.ooc_rate > 2 / 3:
            raise ValueError("ooc_rate must be at most 2/3 (the tail rate is 1.5 x ooc_rate)")
        if len(self.ooc_mix) != 3 or min(self.ooc_mix) < 0 or sum(self.ooc_mix) <= 0:
            raise ValueError("ooc_mix must be three non-negative shares with a positive sum")
