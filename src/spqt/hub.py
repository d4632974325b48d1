"""Models named on the Hugging Face Hub, downloaded once through huggingface_hub into its cache.

A name is `hf:ORG/REPO` (or `hf.co/ORG/REPO`, ollama's form, or the repo's https://huggingface.co/ address), with an
optional `:TAG`: a GGUF file's quantization as llama.cpp's `-hf` takes it (`Q4_K_M`, `q8_0`), or a file's name. A repo
that holds model files (.gguf, .spqt) gives one of them: the tag's (its quantization part matched whole, any case:
`Q4_K` is not `Q4_K_M`, nor `IQ4_K`), else the only one, else Q4_K_M's (llama.cpp's default); several others are an
error that lists them. A repo without such files is a Hugging Face checkpoint: its config, tokenizer, chat template and
safetensors are fetched. huggingface_hub reads HF_HOME (the cache), HF_TOKEN (gated repos) and HF_HUB_OFFLINE (the
cache alone); its progress bars go to stderr. A GGUF split into parts (`-00001-of-00003.gguf`) is refused: merge it
first (llama.cpp's `llama-gguf-split --merge`).
"""

import re
from pathlib import Path, PurePosixPath

from spqt.errors import SpqtError

PREFIXES = ("hf:", "hf.co/", "huggingface.co/", "https://huggingface.co/")
MODEL_SUFFIXES = (".gguf", ".spqt")
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's -hf picks it where the repo has several files and no tag is given
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]  # (merges.txt, vocab.txt)
NOT_CHECKPOINT = ["consolidated*", "original/*"]  # Mistral's and Meta's own copies of the weights
SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.I)


def is_hub_name(arg: str | None) -> bool:
    return bool(arg) and arg.startswith(PREFIXES)


def parse(name: str) -> tuple[str, str | None]:
    """A hub name -> (ORG/REPO, tag or None); SpqtError where it names no repo."""
    rest = next(name[len(p):] for p in PREFIXES if name.startswith(p))
    repo, _, tag = rest.partition(":")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or (_ and not tag):
        raise SpqtError(f"{name}: a Hugging Face model is named hf:ORG/REPO or hf:ORG/REPO:TAG (TAG a quantization "
                        f"such as Q4_K_M, or a file's name)")
    return repo, tag or None


def _tagged(files: list[str], tag: str) -> list[str]:
    """The files a tag names: by name (the path or its last part), else by quantization (whole, any case)."""
    named = [f for f in files if tag in (f, PurePosixPath(f).name)]
    if named:
        return named
    pattern = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(tag)}(?![A-Za-z0-9_])", re.I)
    return [f for f in files if pattern.search(PurePosixPath(f).name)]


def choose(name: str, files: list[str], tag: str | None) -> str | None:
    """The model file of a repo's files that a name asks for; None where the repo holds none (a checkpoint);
    SpqtError where the tag names none or several, or no tag picks one, or the file is split."""
    models = sorted(f for f in files if f.lower().endswith(MODEL_SUFFIXES))
    if not models:
        if tag:
            raise SpqtError(f"{name}: the repo holds no .gguf or .spqt files, so no {tag}")
        return None
    picked = _tagged(models, tag) if tag else models if len(models) == 1 else _tagged(models, DEFAULT_QUANT)
    if len(picked) != 1:
        listing = ", ".join(PurePosixPath(f).name for f in models[:12]) + (" ..." if len(models) > 12 else "")
        what = f"{tag} names {len(picked) or 'none'} of its files" if tag else \
            f"it holds {len(models)} model files and no {DEFAULT_QUANT}: add :TAG"
        if picked and all(SPLIT.search(f) for f in picked):
            what = f"{tag or DEFAULT_QUANT} is a GGUF split into {len(picked)} parts: merge them first " \
                   f"(llama-gguf-split --merge)"
        raise SpqtError(f"{name}: {what} ({listing})")
    if SPLIT.search(picked[0]):
        raise SpqtError(f"{name}: {picked[0]} is one part of a split GGUF: merge the parts first "
                        f"(llama-gguf-split --merge)")
    return picked[0]


def served_name(name: str, path: str | Path) -> str:
    """The name a hub model goes by (spqt serve's model id): its file's stem, a checkpoint's repo name."""
    return Path(path).stem if Path(path).is_file() else parse(name)[0].split("/")[1]


def _hub_error(name: str, e: Exception) -> SpqtError:
    text = " ".join(str(e).split())
    return SpqtError(f"cannot get {name} from the Hugging Face Hub: {type(e).__name__}: {text[:300]}")


def _repo_files(name: str, repo: str) -> list[str]:
    """The repo's files: the Hub's list, or offline (HF_HUB_OFFLINE, no network) those of its cached snapshot."""
    import huggingface_hub

    try:
        return huggingface_hub.list_repo_files(repo)
    except Exception as e:  # offline or unreachable: the cache may hold it
        try:
            folder = Path(huggingface_hub.snapshot_download(repo, local_files_only=True))
        except Exception:
            raise _hub_error(name, e) from None
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def resolve(name: str) -> Path:
    """A hub name -> the local path of its model file or checkpoint folder (downloaded where the cache lacks it).
    huggingface_hub's own warnings (its retries, a line each) are held back: a failure is the one line here."""
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        return _resolve(name)
    finally:
        hub_logging.set_verbosity(level)


def _resolve(name: str) -> Path:
    import huggingface_hub

    repo, tag = parse(name)
    chosen = choose(name, _repo_files(name, repo), tag)
    try:
        if chosen is not None:
            return Path(huggingface_hub.hf_hub_download(repo, chosen))
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=CHECKPOINT_FILES,
                                                      ignore_patterns=NOT_CHECKPOINT))
    except Exception as e:  # network, a gated repo without HF_TOKEN, a full disk: one line
        raise _hub_error(name, e) from None
