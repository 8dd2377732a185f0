"""The embedded offline world: every stage of the pipeline runs on it without downloads.

``python -m rankgrpo.sandbox --out DIR`` writes, deterministically from a seed, a catalog of
invented films, conversations of users with a latent taste, time-ordered train / validation /
test splits in the data format, and a tiny random base model (``DIR/base_model``) with a BPE
tokenizer trained on the sandbox text. ``python -m rankgrpo.sandbox calibrate --world DIR``
scores the popularity list, the simulated teacher and the oracle on the test split.

    world = build_world(SandboxConfig(n_films=300), "sandbox_world")   # or load_world(...)
    teacher = SandboxTeacher(world, ooc_rate=0.3)                 # a chat model: teacher.chat(messages)
    oracle_baseline(world, example); popularity_baseline(world, example.seen_titles)

Modules: ``config`` (SandboxConfig, TeacherConfig), ``vocab`` (word lists), ``world``
(generative story and relevance), ``build`` (files), ``teacher`` (the simulated teacher
and judge), ``baselines`` (popularity, oracle, calibration), ``model`` (tokenizer, base model), ``pretrain`` (opt-in knowledge pretraining of the base model
on text the world writes about its films: ``--pretrain-steps N``).
"""
from rankgrpo.sandbox.baselines import calibrate, calibration_report, oracle_baseline, popularity_baseline
from rankgrpo.sandbox.build import build_world, ensure_world, load_world
from rankgrpo.sandbox.config import SandboxConfig, TeacherConfig
from rankgrpo.sandbox.model import build_base_model, build_tokenizer, save_base_model
from rankgrpo.sandbox.teacher import SandboxTeacher
from rankgrpo.sandbox.world import Taste, World, conversation_key

__all__ = [
    "SandboxConfig", "TeacherConfig", "World", "Taste", "SandboxTeacher", "build_world", "load_world",
    "ensure_world", "popularity_baseline", "oracle_baseline", "calibrate", "calibration_report",
    "build_tokenizer", "build_base_model", "save_base_model", "conversation_key",
]
