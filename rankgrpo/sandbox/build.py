"""Write a sandbox world to a directory, and load it back.

Layout of ``DIR`` (a split directory like the released data, plus the catalog and a model)::

    DIR/catalog.jsonl          {"title","year","genres","keywords","director","popularity","plot"} per film
    DIR/train.jsonl            samples in the data format (prompt, seen_titles,
    DIR/validation.jsonl         groundtruth_with_release_year, num_groundtruth, id, date),
    DIR/test.jsonl               in time order: train < validation < test
    DIR/base_model/            tokenizer + tiny Qwen2 (``from_pretrained``-able): random, or after
                               ``pretrain_steps`` of knowledge pretraining (base_model/pretrain.json:
                               steps, tokens, loss, seconds)
    DIR/hidden/world.json      the SandboxConfig, counts and the sha256 of every data file
    DIR/hidden/tastes.jsonl    the latent taste of every conversation, keyed by conversation_key:
                               what only the simulated teacher and the oracle may read
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from rankgrpo.catalog import load_catalog
from rankgrpo.io import atomic_write_json, atomic_write_text
from rankgrpo.sandbox.config import SandboxConfig
from rankgrpo.sandbox.settings import world_config
from rankgrpo.sandbox.world import (
    FORMAT,
    HIDDEN,
    Taste,
    World,
    catalog_from_films,
    conversation_key,
    conversation_of,
    films_to_jsonl,
    generate_catalog,
    generate_conversations,
    sample_rows,
)

SPLITS = ("train", "validation", "test")
_GENERATOR_MODULES = ("config.py", "vocab.py", "world.py", "build.py", "model.py", "pretrain.py")


def generator_version() -> str:
    """A hash of the code that generates worlds: ``ensure_world`` rebuilds a world written by
    other code, so a directory never silently holds data the current code would not produce."""
    h = hashlib.sha256()
    for name in _GENERATOR_MODULES:
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]
DATA_FILES = ("catalog.jsonl", "train.jsonl", "validation.jsonl", "test.jsonl", f"{HIDDEN}/tastes.jsonl")


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def tokenizer_corpus(world: World, split_rows: dict[str, list[dict]], max_rows: int = 10000):
    """Text the tokenizer is trained on: catalog lines and metadata, and (up to ``max_rows``)
    training conversations with their ground truths written as lists, the prompt's fixed
    instructions included now and then. Validation and test text is left out."""
    for it in world.catalog:
        yield f"{it.title} ({it.year})\n{it.title} ({it.year})"
        yield f"Keywords: {', '.join(it.meta.get('keywords', []))}\nPlots: {it.meta.get('plot', '')}"
    for j, row in enumerate(split_rows["train"][:max_rows]):
        prompt = row["prompt"][0]["content"]
        yield prompt if j % 20 == 0 else conversation_of(prompt)
        yield "\n".join(f"{t} ({y})" for t, y in row["groundtruth_with_release_year"])


def build_world(cfg: SandboxConfig | None = None, out_dir: str | Path = "sandbox_world", *,
                verbose: bool = False) -> World:
    """Generate the world of ``cfg`` into ``out_dir`` and return it (loaded, with ``root`` set).

    Deterministic: the same config gives byte-identical data files (and the same model
    weights). Every file is written atomically; the base model is written to a temporary
    directory and moved into place."""
    cfg = cfg or SandboxConfig()
    cfg.validate()
    out = Path(out_dir)
    films = generate_catalog(cfg)
    world = World(cfg, catalog_from_films(films))
    convs = generate_conversations(world, {"train": cfg.n_train, "validation": cfg.n_validation,
                                           "test": cfg.n_test})
    splits = {s: [conv for conv in convs if conv.split == s] for s in SPLITS}

    split_rows = {s: [row for conv in splits[s] for row in sample_rows(world, conv)] for s in SPLITS}
    taste_rows = []
    for s in SPLITS:
        for conv in splits[s]:
            row = {"key": conversation_key(conv.text), "split": s,
                   "ids": [f"sbx-{conv.index:06d}-{r}" for r in range(len(conv.groundtruths))]}
            row.update(conv.taste.to_json(world.catalog))
            taste_rows.append(row)
    texts = {"catalog.jsonl": films_to_jsonl(films), f"{HIDDEN}/tastes.jsonl": _jsonl(taste_rows)}
    texts.update({f"{s}.jsonl": _jsonl(split_rows[s]) for s in SPLITS})
    for name in DATA_FILES:
        atomic_write_text(out / name, texts[name])
    manifest = {
        "format": FORMAT,
        "generator": generator_version(),
        "config": dataclasses.asdict(cfg),
        "counts": {"films": len(films), **{s: len(split_rows[s]) for s in SPLITS},
                   **{f"{s}_conversations": len(splits[s]) for s in SPLITS}},
        "sha256": {name: hashlib.sha256(texts[name].encode("utf-8")).hexdigest() for name in DATA_FILES},
    }
    if cfg.build_model:
        from rankgrpo.sandbox.model import build_base_model, build_tokenizer, save_base_model

        named = cfg.title_tokens
        tokenizer = build_tokenizer(tokenizer_corpus(world, split_rows), cfg.vocab_size, cfg.max_position_embeddings,
                                    titles=[it.title for it in world.catalog] if named else (),
                                    years=[it.year for it in world.catalog] if named else ())
        model = build_base_model(tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                                 num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                 intermediate_size=cfg.intermediate_size, tie_embeddings=cfg.tie_embeddings,
                                 max_position_embeddings=cfg.max_position_embeddings, seed=cfg.seed)
        pretrain_record = None
        if cfg.pretrain_steps:
            from rankgrpo.sandbox.pretrain import pretrain_base_model

            pretrain_record = pretrain_base_model(
                model, tokenizer, world, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                batch_size=cfg.pretrain_batch_size, seq_len=cfg.pretrain_seq_len,
                fact_renderings=cfg.pretrain_fact_renderings, co_preference_sentences=cfg.pretrain_co_preference,
                lists=cfg.pretrain_catalog_lists, chat_questions=cfg.pretrain_chat_questions, seed=cfg.seed,
                progress=verbose)
            if verbose:
                r = pretrain_record
                print(f"knowledge pretraining: {r['steps']} steps, {r['tokens_seen']} tokens "
                      f"(corpus {r['corpus_tokens']} tokens, {r['corpus_documents']} documents), "
                      f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}, {r['seconds']:.1f}s")
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".base_model.", dir=out))
        try:
            save_base_model(tmp, tokenizer, model)
            if pretrain_record is not None:
                atomic_write_json(tmp / "pretrain.json", pretrain_record)
            if (out / "base_model").exists():
                shutil.rmtree(out / "base_model")
            tmp.rename(out / "base_model")
            (out / "base_model").chmod(0o755)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        manifest["counts"]["model_parameters"] = sum(p.numel() for p in model.parameters())
        manifest["counts"]["vocab_size"] = len(tokenizer)
        if pretrain_record is not None:
            manifest["counts"]["pretrain_tokens"] = pretrain_record["tokens_seen"]
    atomic_write_json(out / HIDDEN / "world.json", manifest)  # written last: marks the world complete
    if verbose:
        c = manifest["counts"]
        print(f"sandbox world in {out}: {c['films']} films, train/validation/test = "
              f"{c['train']}/{c['validation']}/{c['test']} samples"
              + (f", base model {c['model_parameters'] / 1e6:.1f}M parameters" if cfg.build_model else ""))
    return load_world(out)


def load_world(root: str | Path) -> World:
    """Load a world written by ``build_world`` (catalog, config and the hidden tastes)."""
    root = Path(root)
    manifest_path = root / HIDDEN / "world.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{root}: not a sandbox world (no {HIDDEN}/world.json); "
                                "build one with `python -m rankgrpo.sandbox --out DIR`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: unknown sandbox format {manifest.get('format')!r} (expected {FORMAT})")
    names = {f.name for f in dataclasses.fields(SandboxConfig)}
    cfg = SandboxConfig(**{k: v for k, v in manifest["config"].items() if k in names})
    catalog = load_catalog(root / "catalog.jsonl")
    tastes = {}
    with open(root / HIDDEN / "tastes.jsonl", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                tastes[row["key"]] = Taste.from_json(row, catalog)
    return World(cfg, catalog, tastes, root)


def ensure_world(out_dir: str | Path = "sandbox_world", cfg: SandboxConfig | None = None, *,
                 verbose: bool = True) -> World:
    """Load the world in ``out_dir`` if this code built it from ``cfg`` (None: the demo's world,
    ``rankgrpo.sandbox.settings.world_config()``), otherwise build it there. What every script
    calls when no data is given."""
    cfg = cfg or world_config()
    manifest_path = Path(out_dir) / HIDDEN / "world.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        model_ok = not cfg.build_model or (Path(out_dir) / "base_model" / "config.json").is_file()
        same = manifest.get("config") == dataclasses.asdict(cfg) and manifest.get("generator") == generator_version()
        if manifest.get("format") == FORMAT and same and model_ok:
            return load_world(out_dir)
    return build_world(cfg, out_dir, verbose=verbose)
