"""Models named on the Hugging Face Hub, downloaded once through huggingface_hub into its cache.

A name is `hf:ORG/REPO` (or `hf.co/ORG/REPO`, ollama's form, or the repo's https://huggingface.co/ address), with an
optional `:TAG`: a GGUF file's quantization as llama.cpp's `-hf` takes it (`Q4_K_M`, `q8_0`), or a file's name. A repo
that holds model files (.gguf, .spqt; not the mmproj, imatrix and draft GGUFs llama.cpp skips too) gives one of them:
the tag's (its quantization part matched whole, any case: `Q4_K` is not `Q4_K_M`, nor `IQ4_K`; a whole file before a
split one), else the only one, else as llama.cpp picks (Q4_K_M's, else Q8_0's, else the first); a GGUF split into parts
(`-00001-of-00003.gguf`) comes whole, every part, and runs from its first. A repo without model files is a Hugging
Face checkpoint: its top-level config, tokenizer, chat template and weights (safetensors, else pytorch_model*.bin)
are fetched. huggingface_hub reads HF_HOME (the cache), HF_TOKEN (gated and private repos) and HF_HUB_OFFLINE; offline
or unreachable, a repo comes from its cached snapshot. Its progress bars go to stderr.
"""
import re
from pathlib import Path, PurePosixPath

from spqt.errors import SpqtError

PREFIXES = ("hf:", "hf.co/", "huggingface.co/", "https://huggingface.co/")
MODEL_SUFFIXES = (".gguf", ".spqt")
FALLBACK_QUANTS = ("Q4_K_M", "Q8_0")  # llama.cpp's -hf without a tag: Q4_K_M's file, else Q8_0's, else the first
NOT_MODELS = re.compile(r"^(mmproj|imatrix|mtp-|eagle3-|dflash-|dspark-)", re.I)  # GGUFs llama.cpp's -hf skips too
CHECKPOINT_FILES = re.compile(r"[^/]+\.(json|safetensors|jinja|model|tiktoken|txt)")  # top-level files _open_hf reads
OLD_WEIGHTS = re.compile(r"pytorch_model[^/]*\.bin")  # where a repo has no safetensors
NOT_CHECKPOINT = re.compile(r"consolidated.*")  # Mistral's own copy of the weights
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.I)


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


def _units(models: list[str]) -> dict[str, list[str]]:
    """Model files by the model they hold: a file alone, a split GGUF's parts together (in order) under the name
    without the part (m-Q4_K_M-00001-of-00002.gguf: m-Q4_K_M.gguf)."""
    units: dict[str, list[str]] = {}
    for f in sorted(models):
        split = SPLIT.search(f)
        units.setdefault(f[:split.start()] + f[split.end() - 5:] if split else f, []).append(f)
    return units


def _tagged(units: dict[str, list[str]], tag: str) -> list[str]:
    """The units a tag names: by a file's name (its path or last part), else by quantization (whole, any case)."""
    named = [u for u, parts in units.items() if any(tag in (f, PurePosixPath(f).name) for f in [u, *parts])]
    if named:
        return named
    pattern = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(tag)}(?![A-Za-z0-9_])", re.I)
    return [u for u in units if pattern.search(PurePosixPath(u).name)]


def choose(name: str, files: list[str], tag: str | None) -> list[str] | None:
    """The model file a name asks for among a repo's files, as its parts (one, or a split GGUF's in order); None where
    the repo holds no model file (a checkpoint); SpqtError where the tag names none or several, or a split GGUF lacks
    parts."""
    models = [f for f in files if f.lower().endswith(MODEL_SUFFIXES) and not NOT_MODELS.match(PurePosixPath(f).name)]
    if not models:
        if tag:
            raise SpqtError(f"{name}: the repo holds no .gguf or .spqt model files, so no {tag}")
        return None
    units = _units(models)
    if tag:
        picked = _tagged(units, tag)
    else:
        picked = next((found for q in FALLBACK_QUANTS if (found := _tagged(units, q))), [next(iter(units))])
        picked = list(units) if len(units) == 1 else picked
    if len(picked) > 1:  # a whole file before a split one of the same quantization
        picked = [u for u in picked if len(units[u]) == 1 and not SPLIT.search(units[u][0])] or picked
    if len(picked) != 1:
        listing = ", ".join(PurePosixPath(u).name for u in list(units)[:12]) + (" ..." if len(units) > 12 else "")
        raise SpqtError(f"{name}: {tag or 'the default'} names {len(picked) or 'none'} of its model files ({listing})")
    parts = units[picked[0]]
    split = SPLIT.search(parts[0])
    if split and [int(SPLIT.search(f)[1]) for f in parts] != list(range(1, int(split[2]) + 1)):
        raise SpqtError(f"{name}: the repo holds {len(parts)} of the {int(split[2])} parts of {picked[0]}")
    return parts


def checkpoint_files(files: list[str]) -> list[str]:
    """The top-level files of a checkpoint repo that its folder needs (config, tokenizer, template, weights: the
    safetensors, or pytorch_model*.bin where there are none), not Mistral's consolidated copy nor subfolders."""
    top = [f for f in files if CHECKPOINT_FILES.fullmatch(f) and not NOT_CHECKPOINT.match(f)]
    if not any(f.endswith(".safetensors") for f in top):
        top += [f for f in files if OLD_WEIGHTS.fullmatch(f)]
    return top


def served_name(name: str, path: str | Path) -> str:
    """The name a hub model goes by (spqt serve's model id): its file's stem, a checkpoint's repo name."""
    return Path(path).stem if Path(path).is_file() else parse(name)[0].split("/")[1]


def _is(e: Exception, kind: str) -> bool:
    """Whether e is huggingface_hub's error of that class name (or a subclass's), without importing its errors."""
    return kind in {k.__name__ for k in type(e).__mro__}


def _hub_error(name: str, repo: str, e: Exception) -> SpqtError:
    if _is(e, "GatedRepoError"):
        return SpqtError(f"{name} is gated: accept its terms at https://huggingface.co/{repo} and set HF_TOKEN")
    if _is(e, "RepositoryNotFoundError"):
        return SpqtError(f"{name}: no such repo on the Hugging Face Hub (or a private one: set HF_TOKEN)")
    text = " ".join(str(e).split())
    return SpqtError(f"cannot get {name} from the Hugging Face Hub: {type(e).__name__}: {text[:300]}")


def _cached(repo: str) -> Path | None:
    """The repo's snapshot folder in huggingface_hub's cache (its main revision), None where there is none."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    try:
        folder = root / "snapshots" / (root / "refs" / "main").read_text().strip()
    except OSError:
        return None
    return folder if folder.is_dir() else None


def resolve(name: str) -> Path:
    """A hub name -> the local path of its model file (a split GGUF's first part) or checkpoint folder (downloaded
    where the cache lacks it; offline or unreachable, the cached snapshot's). huggingface_hub's own warnings (its
    retries, a line each) are held back: a failure is the one line here."""
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
    try:
        files = huggingface_hub.list_repo_files(repo)
    except Exception as e:  # offline or unreachable: the cache may hold it
        folder = _cached(repo)
        if folder is None or _is(e, "RepositoryNotFoundError"):
            raise _hub_error(name, repo, e) from None
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        parts = choose(name + " (offline: the cached files)", files, tag)
        return folder / parts[0] if parts else folder
    parts = choose(name, files, tag)
    try:
        if parts:
            return Path([huggingface_hub.hf_hub_download(repo, f) for f in parts][0])
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=checkpoint_files(files)))
    except Exception as e:  # network, a gated repo without HF_TOKEN, a full disk: one line
        raise _hub_error(name, repo, e) from None
