"""The `spqt` command. Each subcommand is a thin shell over a library function.

Errors a person can fix (bad paths, corrupt files, unsupported models, out-of-range options)
are SpqtError: one line on stderr, exit code 2, no traceback.
"""

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spqt.errors import SpqtError

if TYPE_CHECKING:  # (imported where used: building the parser stays light)
    from spqt.generate import Generator

PROMPT_TOKENS, NEW_TOKENS = 10, 128  # a timed decode's defaults: spqt bench decode, spqt tune --routes

EXIT_USAGE = 2


def _floats(text: str) -> list[float]:
    """One or more comma-separated numbers (empty items left out); none at all is a usage error."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _at_least(low: int):
    """An argparse type: an integer of at least `low` (one clear usage error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a pipe's (--data <(zcat x.gz)); a missing file, a folder, a device or bytes
    that are not UTF-8 are SpqtError."""
    path = Path(path)
    if path.is_dir():
        raise SpqtError(f"{path} is a folder, not a text file")
    if not path.exists():
        raise SpqtError(f"no such file: {path}")
    if not path.is_file() and not path.is_fifo():  # (a device such as /dev/zero would be read without end)
        raise SpqtError(f"{path} is not a text file (a device or another special file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SpqtError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise SpqtError(f"cannot read {path}: {e.strerror or e}") from None


def _level(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or auto, got {text!r}") from None


def _criterion(args, loaded) -> str:
    """--criterion checked (one clear error line), or the model's default criterion."""
    from spqt import sparsity as sp

    return sp.check_criterion(args.criterion) if args.criterion else sp.default_criterion(loaded.thresholds)


def _model_path(arg: str | None) -> Path:
    """A model argument's path: the default model's (converted on first use), a Hugging Face Hub name's (hf:ORG/REPO,
    downloaded on first use: spqt.hub), else the argument."""
    from spqt import hub
    from spqt.default_model import default_spqt

    if not arg:
        return default_spqt()
    return hub.resolve(arg) if hub.is_hub_name(arg) else Path(arg)


def _model_file(arg: str | None) -> str | None:
    """The model's path for _check_outputs, without converting the default model (its cache path) or downloading a
    hub model (None: the hub's cache, not a path of the command's)."""
    from spqt import hub
    from spqt.default_model import default_spqt_path

    return None if hub.is_hub_name(arg) else arg or str(default_spqt_path())


def _check_outputs(outputs: list[tuple[str, str | None]], inputs: list[tuple[str, str | None]]) -> None:
    """SpqtError where an output path (named by its flag) is one of the command's inputs or an output before it: the
    command would overwrite a file it reads, or write one file twice. Pairs of (name, path), None skipped, and an
    input "-" (standard input); an input folder's files are inputs too. Two paths are one file where their realpaths
    agree (a link, ./x; no error on a symlink loop) or, both existing, os.path.samefile says so (hard links, a
    case-insensitive file system)."""
    seen: list[tuple[str, str]] = []  # (path, what it is)
    for name, path in inputs:
        if path and path != "-":
            seen.append((path, name))
            if os.path.isdir(path):  # an HF checkpoint folder: the files it holds are read too
                seen += [(str(f), f"{name}'s file") for f in Path(path).iterdir()]
    for flag, path in outputs:
        if not path:
            continue
        for other, name in seen:
            if _same_file(path, other):
                raise SpqtError(f"the output {flag} {path} is also the {name}: write it to another path")
        seen.append((path, f"output {flag}"))


def _check_spqt_name(flag: str, path: Path) -> None:
    """SpqtError where a .spqt output is named .gguf: every command reads a file of that name as a GGUF (and refuses
    a .spqt there), so the model written would not load."""
    if path.suffix.lower() == ".gguf":
        raise SpqtError(f"the output {flag} {path} is named .gguf, but spqt writes a .spqt file, which a .gguf name "
                        f"would be read as: name it .spqt")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


# ---------------------------------------------------------------- quantize / inspect


def cmd_quantize(args) -> int:
    from spqt.checkpoint import check_writable, quantize_source, save_spqt
    from spqt.generate import resolve_device
    from spqt.sources import open_source

    from spqt.formats import check_search
    from spqt.layouts import check_layout
    from spqt.mixes import check_quant_type, head_type

    fmt = check_quant_type(args.type)  # before the (slow) load, so a bad type fails at once
    head_type(fmt, args.head)
    check_layout(args.layout)
    check_search(args.search, fmt)
    if args.gptq_tokens is not None and not args.gptq:
        raise SpqtError("--gptq-tokens counts the tokens of --gptq TEXT...: pass the calibration text too")
    texts = [_read_text(f) for f in args.gptq or []]  # before the load: a bad path fails at once
    out = Path(args.output)
    _check_outputs([("-o", args.output)], [("source", args.source)]
                   + [("--gptq calibration text", f) for f in args.gptq or []])
    _check_spqt_name("-o", out)
    check_writable(out)
    device = resolve_device(args.device)
    start = time.perf_counter()
    source = open_source(_model_path(args.source))
    note = _requantized_note(source, args.source, args.layout, bool(texts))
    if note:
        print(f"spqt: note: {note}", file=sys.stderr)
    calibration = None
    if texts:
        from spqt.tokenizer import TextTokenizer

        tok = TextTokenizer(source.tokenizer, source.config)
        calibration = [t for text in texts for t in tok.encode(text, add_bos=False)]  # in the order given
    model = quantize_source(source, args.type, args.layout, device=device, progress=True, search=args.search,
                            head=args.head, calibration=calibration, calibration_tokens=args.gptq_tokens)
    save_spqt(model, out)
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s on {device}")
    return 0


def _requantized_note(source, path: str, layout: str, gptq: bool) -> str | None:
    """The note for a zigzag conversion of a GGUF whose weights are quantized already (source.weight_types) without
    --gptq: the zigzag grid re-rounds each value of the file's row blocks, which costs the most of any conversion
    here (docs/RESULTS.md, issue 15's table); None otherwise."""
    from spqt.sources import FLOAT_TYPES

    rounded = [t for t in source.weight_types if t not in FLOAT_TYPES]
    if layout != "zigzag" or gptq or not rounded:
        return None
    return (f"{Path(path).name}'s weights are quantized already ({', '.join(rounded)}): zigzag blocks, which run down "
            "its row blocks' columns, round them again (the default model's Q4_1 GGUF, WikiText-2 perplexity over "
            "its own: zigzag Q4_K +13.8 %, Q5_K +3.2 %, Q6_K +0.7 %, Q4_K with --gptq BOOK.txt +8.5 %); a wider "
            "--type or --gptq loses less, and a float checkpoint, where you have one, is rounded once")


def _end_tokens(model) -> str:
    """The tokens a generation ends on (TextTokenizer.stop_ids), "id text" each, ascending; the ids alone where the
    model's tokenizer data cannot name them."""
    from spqt.tokenizer import TextTokenizer

    try:
        tok = TextTokenizer(model.tokenizer, model.config)
    except SpqtError:
        return ", ".join(map(str, sorted(model.config.eos_ids))) or "none"
    stops = sorted(tok.stop_ids)
    return ", ".join(f"{i} {tok.backend.id_to_token(i)}" for i in stops) or "none"


def _inspected_model(path: Path):
    """(model, layers_counted, stored_types): a .spqt whole (memory-mapped), 1, {}; a GGUF's or HF folder's
    configuration, tokenizer and weights outside the layers with layer 0's alone (float32), n_layers (each layer has
    layer 0's shapes, so the others are counted, not read: a 70B's maps in float32 would be 280 GB) and a GGUF's
    SourceModel.stored_types."""
    from spqt.checkpoint import LoadedModel, fused_layer_weights, is_gguf, load_model
    from spqt.sources import open_source

    if path.is_file() and not is_gguf(path):
        return load_model(path), 1, {}
    source = open_source(path)
    weights = {name: source.tensor(name) for name in ("tok_embeddings", "norm", "output") if name in source.names}
    weights |= fused_layer_weights(source, 0)
    model = LoadedModel(config=source.config, tokenizer=source.tokenizer, weights=weights, parts={},
                        provenance=dict(source.provenance))
    return model, source.config.n_layers, source.stored_types


def cmd_inspect(args) -> int:
    from spqt.checkpoint import QuantizedWeight

    model, layers_counted, stored = _inspected_model(_model_path(args.model))
    c = model.config
    print(f"model        {args.model}")
    print(f"kind         {model.kind}")
    switches = "".join([f", biases on {'/'.join(c.linear_biases)}" if c.linear_biases else "",
                        ", q/k norm" if c.qk_norm else "",
                        " over all heads" if c.qk_norm_scope == "all" else "",
                        f", no RoPE in layers {', '.join(map(str, c.nope_layers))}" if c.nope_layers else "",
                        f", RoPE on {c.rope_dims} of {c.head_dim} head dims" if c.rope_dims else "",
                        ", post-norms" if c.post_norms else "",
                        ", no pre-norms" if not c.pre_norms else "",
                        f", {c.activation} MLP" if c.activation != "silu" else "",
                        f", embeddings x {c.embed_scale:g}" if c.embed_scale != 1.0 else "",
                        f", window {c.sliding_window} in layers {', '.join(map(str, c.sliding_layers))}"
                        if c.sliding_layers else "",
                        f" (local rope theta {c.rope_local_theta:g})" if c.rope_local_theta else "",
                        f", attention scores capped at {c.attn_logit_softcap:g}" if c.attn_logit_softcap else "",
                        f", logits capped at {c.final_logit_softcap:g}" if c.final_logit_softcap else ""])
    print(f"architecture {c.family}: {c.n_layers} layers, dim {c.dim}, heads {c.n_heads} (kv {c.n_kv_heads}), "
          f"head_dim {c.head_dim}, ffn {c.ffn_dim}, vocab {c.vocab_size}, context {c.max_seq_len}, "
          f"rope theta {c.rope_theta:g}{_rope_scaling_label(c)}, "
          f"tied head {c.tie_embeddings}{switches}")
    print(f"end tokens   {_end_tokens(model)}")
    quant_bytes = quant_weights = other_bytes = float_bytes = float_weights = 0
    rows = []
    for name, w in model.weights.items():
        times = layers_counted if name.startswith("layers.") else 1  # (the layers not read, where layer 0's alone)
        if isinstance(w, QuantizedWeight):
            n, k = w.shape
            quant_bytes += w.nbytes
            quant_weights += n * k
            if name.startswith("layers.0.") or not name.startswith("layers."):  # layer 0's maps and the head
                rows.append((name, f"{w.fmt} {w.layout}", f"{n}x{k}", f"{8 * w.nbytes / (n * k):.2f}"))
        else:
            if name.startswith("layers.") and w.dim() == 2:  # a linear map kept in float (a GGUF's or HF model's)
                float_bytes += times * w.numel() * w.element_size()
                float_weights += times * w.numel()
            else:
                other_bytes += times * w.numel() * w.element_size()
            if not name.startswith("layers.") or name.startswith("layers.0."):
                rows.append((name, str(w.dtype).replace("torch.", ""), "x".join(map(str, w.shape)), ""))
    per_group = _types_per_group(model.weights)
    alike = all(len(by_type) == 1 for by_type in per_group.values())
    print(f"{'tensor':28s} {'format':16s} {'shape':>12s} {'bits/w':>7s}   "
          f"(layer 0 shown; {'all layers alike' if alike else 'types per layer below'})")
    for r in rows:
        print(f"{r[0]:28s} {r[1]:16s} {r[2]:>12s} {r[3]:>7s}")
    if not alike:
        for group, by_type in per_group.items():
            print(f"types        {group:8s} " + "; ".join(f"{fmt} in layers {_ranges(layers)}" for fmt, layers in by_type.items()))
    if quant_weights:
        print(f"quantized    {quant_bytes / 1e6:.2f} MB for {quant_weights / 1e6:.2f} M weights: "
              f"{8 * quant_bytes / quant_weights:.3f} bits per weight (zero padding included)")
    if float_weights:
        print(f"float maps   {float_bytes / 1e6:.2f} MB for {float_weights / 1e6:.2f} M weights, as loaded "
              f"(spqt quantize stores them in blocks)")
    if stored:  # a GGUF's own blocks, which the float rows above hide
        weights, nbytes = (sum(counts[i] for counts in stored.values()) for i in (1, 2))
        print("file types   " + ", ".join(f"{name} {count} tensor{'s' * (count > 1)}"
                                         for name, (count, _, _) in stored.items())
              + f": {nbytes / 1e6:.2f} MB for {weights / 1e6:.2f} M weights, {8 * nbytes / weights:.3f} bits per "
              f"weight (the GGUF's own; run here as float)")
    float_head = "output" in model.weights and not hasattr(model.weights["output"], "fmt")
    print(f"other        {other_bytes / 1e6:.2f} MB (embedding, {'head, ' if float_head else ''}norms)")
    if model.thresholds:
        from spqt import sparsity as sp

        t = sp.by_criterion(model.thresholds)
        for criterion in sp.CRITERIA:
            for mode in sp.MODES:
                levels = t.get(criterion, {}).get(mode, {})
                if mode == "global" and not levels:
                    continue
                print(f"thresholds   {criterion} {mode}: sparsity {', '.join(sorted(levels)) or 'none'}")
        rec = t.get("recommended")
        if rec and rec.get("criterion"):
            print(f"recommended  {rec['criterion']} {rec['mode']} sparsity {rec['sparsity']:g} (held-out perplexity "
                  f"within +{100 * rec['max_loss']:g} % of dense)")
        elif rec:  # sparsity.recommend found no level within the bound, or none measured (calibrate.merge): dense
            why = (f"no level's held-out perplexity within +{100 * rec['max_loss']:g} % of dense" if rec.get("held_out")
                   else "no level measured on held-out text")
            print(f"recommended  dense ({why})")
    else:
        print(f"thresholds   none (run {'spqt quantize, then ' if model.kind == 'float' else ''}spqt calibrate)")
    if model.column_norms:
        print(f"column norms {len(model.column_norms)} linear maps (WINA criterion)")
    if model.provenance:
        print(f"provenance   {json.dumps(model.provenance)}")
    return 0


def _types_per_group(weights: dict) -> dict:
    """'qkv' -> {format: [layers stored in it]}, widest format first, for every quantized group."""
    from spqt.formats import FORMATS

    out: dict = {}
    for name, w in weights.items():
        parts = name.split(".")
        if hasattr(w, "fmt") and len(parts) == 3 and parts[0] == "layers":
            out.setdefault(parts[2], {}).setdefault(w.fmt, []).append(int(parts[1]))
    order = list(FORMATS)
    return {g: dict(sorted(by.items(), key=lambda kv: order.index(kv[0]))) for g, by in out.items()}


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 8] -> '0-2, 5, 8'."""
    spans: list[list[int]] = []
    for i in sorted(layers):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


# ---------------------------------------------------------------- generate / perplexity


def _load(args, path: Path | None = None):
    """The model of args.model (at path, where the caller resolved it already), with --thresholds where given."""
    from spqt.checkpoint import load_model

    path = path or _model_path(args.model)
    try:
        loaded = load_model(path, progress=True)
    except SpqtError as e:
        if args.model:
            raise
        raise SpqtError(f"{e} (the default model's conversion in the cache: delete {path} and spqt converts it "
                        f"again)") from None
    if getattr(args, "thresholds", None):
        table_path = Path(args.thresholds)
        try:
            doc = json.loads(_read_text(table_path))
            loaded.thresholds = doc["thresholds"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SpqtError(f"{table_path}: not a thresholds file written by spqt calibrate --json ({e})") from None
        from spqt.sparsity import check_thresholds

        check_thresholds(loaded.thresholds, loaded.config.n_layers, str(table_path))
    return loaded


def _prompt_file(name: str) -> str:
    """generate -f: the text of a file ("-": standard input), less one trailing newline; SpqtError where it cannot
    be read as UTF-8."""
    stdin_bytes = getattr(sys.stdin, "buffer", None)  # read as UTF-8 whatever the locale (a StringIO has none)
    if name == "-" and sys.stdin is None:  # started with stdin closed (`<&-`): Python gives None
        raise SpqtError("cannot read the prompt file -: standard input is closed")
    try:
        if name != "-":
            text = Path(name).read_text(encoding="utf-8")
        else:
            text = stdin_bytes.read().decode("utf-8") if stdin_bytes is not None else sys.stdin.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SpqtError(f"cannot read the prompt file {name}: {getattr(e, 'strerror', None) or e}") from None
    return text[:-1] if text.endswith("\n") else text


def _structured_text(args) -> tuple[str, str] | None:
    """generate's structured-output flags -> (kind "json_schema" or "gbnf", its text), or None; the files read and a
    schema's JSON parsed now, before the (slow) load."""
    given = None
    if args.json_schema is not None or args.json_schema_file is not None:
        given = "json_schema", (args.json_schema if args.json_schema_file is None else
                                _read_text(args.json_schema_file))
        from spqt.grammar import parse_schema

        parse_schema(given[1], "the JSON schema")
    elif args.grammar is not None or args.grammar_file is not None:
        given = "gbnf", args.grammar if args.grammar_file is None else _read_text(args.grammar_file)
    return given


def _structured_grammar(given: tuple[str, str] | None, tok, loaded):
    """_structured_text's (kind, text) -> a spqt.grammar.Grammar over the model's vocabulary (its end: the stop ids),
    or None."""
    if given is None:
        return None
    from spqt import grammar

    return grammar.build(*given, grammar.Vocabulary(tok, loaded.config.vocab_size, tok.stop_ids))


def _rope_scaling_label(c) -> str:
    """inspect's note on a model's RoPE scaling: Llama 3's (as HF gives it), longrope's (its attention factor and
    switch), YaRN's (its attention factor), linear (every frequency divided by one factor), or per-frequency divisors
    (a GGUF's rope_freqs: Llama 3's)."""
    if c.rope_scaling:
        return " (llama3 scaling)"
    if c.rope_long_freq_factors:
        return (f" (longrope scaling, attention factor {c.rope_attention_factor:.4g}, long factors in runs past "
                f"{c.rope_original_context} tokens)")
    if c.rope_attention_factor != 1.0:
        return f" (yarn scaling, attention factor {c.rope_attention_factor:.4g})"
    if c.rope_freq_factors and len(set(c.rope_freq_factors)) == 1:
        return f" (linear scaling x{c.rope_freq_factors[0]:g})"
    return " (llama3 scaling)" if c.rope_freq_factors else ""


def _check_decoding(args) -> None:
    """generate's and chat's options checked before the (slow) load: --sparsity and -n."""
    from spqt.sparsity import check_sparsity

    if args.sparsity != "auto":
        check_sparsity(args.sparsity)
    if args.n < 1:
        raise SpqtError("-n must be at least 1")


def _sampling(args):
    """The Sampling of generate's and chat's sampling options (_add_sampling_options); SpqtError where one is out of
    range. Without --seed a random one, as llama.cpp's and transformers' unseeded sampling (a fixed default gave every
    run the same text)."""
    import secrets

    from spqt.generate import Sampling

    seed = secrets.randbits(63) if args.seed is None else args.seed
    return Sampling(args.temperature, args.top_k, args.top_p, seed, min_p=args.min_p,
                    repetition_penalty=args.repeat_penalty, frequency_penalty=args.frequency_penalty,
                    presence_penalty=args.presence_penalty)


def _runtime(args) -> tuple:
    """(device, dtype, the CPU GEMV's backend) of --device, --dtype and --gemv, before the (slow) load so a bad one
    fails at once."""
    from spqt.generate import resolve_device

    device = resolve_device(args.device)
    return device, _dtype(args.dtype, device), _gemv_backend(args.gemv, device)


@dataclass
class Decoder:
    """generate's and chat's Generator with what they report of it (_decoder)."""

    generator: "Generator"
    sparsity: float  # the level decoded at (--sparsity auto resolved)
    criterion: str
    mode: str
    kept: str | None  # sparse maps in one launch (Generator.kept_runs): the achieved sparsity is not counted then
    track: bool  # count the achieved sparsity (generate's track)


def _decoder(args, loaded, device: str, dtype, backend: str | None, max_len: int, label: bool = True) -> Decoder:
    """The Generator of generate's and chat's sparsity options (--sparsity, auto included, --criterion, --mode,
    --no-dense-fallback) on a KV cache of max_len tokens; the model line ([kind, device, sparsity ...], where label
    asks for it) and the notes on which maps run how go to stderr."""
    from spqt.generate import KEPT_ROUTE_NAMES, Generator

    criterion = _criterion(args, loaded)
    mode, level = args.mode, args.sparsity
    if level == "auto":
        from spqt.sparsity import auto_level, by_criterion

        criterion, mode, level = auto_level(loaded.thresholds, args.criterion and criterion, mode)
        if not by_criterion(loaded.thresholds).get("recommended"):
            print("spqt: note: the model has no recommended sparsity level (spqt calibrate measures one); "
                  "--sparsity auto decodes dense", file=sys.stderr)
    if not mode:
        from spqt.sparsity import default_mode

        mode = default_mode(loaded.thresholds, criterion)
    gen = Generator(loaded, device, dtype=dtype, sparsity=level, mode=mode, criterion=criterion,
                    max_len=max_len, dense_fallback=not args.no_dense_fallback, backend=backend)
    # stdout carries the generated text alone (so `> out.txt` keeps just that); the rest goes to
    # stderr, as llama.cpp does
    if label:
        setting = f" {criterion} {mode}" if level else ""
        gemv = {"cpu-fp16": " fp16-gemv", "cpu-native": " native-gemv"}.get(backend, "")
        print(f"[{loaded.kind}, {gen.device}{gemv}, sparsity {level:g}{setting}]", file=sys.stderr, flush=True)
    dense, dense_step = gen.dense_fallbacks(), gen.dense_step_reason()
    if device == "cuda":
        from spqt.bench import untuned_note

        note = untuned_note(loaded, sparse=bool(level) and dense_step is None)
        if note:
            print(f"[{note}]", file=sys.stderr, flush=True)
    if dense_step:
        print(f"[every linear map runs dense: {dense_step}]", file=sys.stderr, flush=True)
    elif dense:
        print(f"[{len(dense)} of {4 * loaded.config.n_layers} linear maps run dense: {gen.dense_fallback_note()}; "
              f"--no-dense-fallback runs them sparse]", file=sys.stderr, flush=True)
    # MODE_KEPT (sparse maps in one launch) runs where the steps do not count the achieved sparsity (counting takes
    # the collected path): where it applies, decode fast and do not count; nor where every map runs dense (counting
    # would add a kernel a map to a step that should run as fast as the dense one, to count nothing)
    kept, route = gen.kept_runs(), gen.tuned_route_runs()
    if route:
        print(f"[{KEPT_ROUTE_NAMES[route]} in one launch each: spqt tune --routes measured it faster for this model on "
              f"this GPU (the achieved sparsity is not counted then); SPQT_SPARSE_KEPT=0 turns it off]",
              file=sys.stderr, flush=True)
    elif kept:
        print(f"[sparse maps in one launch where SPQT_SPARSE_KEPT={kept} asks (the achieved sparsity is not counted "
              f"then)]", file=sys.stderr, flush=True)
    return Decoder(gen, level, criterion, mode, kept, track=kept is None and dense_step is None)


def cmd_generate(args) -> int:
    from spqt.tokenizer import TextTokenizer

    _check_decoding(args)
    if args.system is not None and not args.chat:
        raise SpqtError("--system is the chat's system message: it needs --chat")
    if args.thinking_budget is not None and not args.chat:
        raise SpqtError("--thinking-budget bounds a reasoning model's thinking in a chat: it needs --chat")
    _check_outputs([("--json", args.json)], [("model", _model_file(args.model)), ("prompt file", args.file),
                                              ("--thresholds file", args.thresholds),
                                              ("--json-schema-file", args.json_schema_file),
                                              ("--grammar-file", args.grammar_file)])
    prompt_text = args.prompt if args.file is None else _prompt_file(args.file)
    structured = _structured_text(args)
    if args.json:
        from spqt.checkpoint import check_writable

        check_writable(Path(args.json))  # before the (slow) load
    sampling = _sampling(args)
    device, dtype, backend = _runtime(args)
    loaded = _load(args)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    prompt = tok.chat(prompt_text, args.system) if args.chat else tok.encode(prompt_text)
    sampling.grammar = _structured_grammar(structured, tok, loaded)
    if args.thinking_budget is not None:
        _check_thinking_budget(tok, loaded)
    if args.chat and (sampling.grammar is not None or args.thinking_budget is not None):
        # a reasoning model thinks first (within its budget), then keeps to the grammar
        from spqt.grammar import Vocabulary
        from spqt.serve.reasoning import chat_grammar

        sampling.grammar = chat_grammar(sampling.grammar, tok, tok.one_turn(prompt_text, args.system),
                                        args.thinking_budget, Vocabulary(tok, loaded.config.vocab_size, tok.stop_ids))
    if not prompt:  # here, not in Generator.generate: after the model line, the error would be a second line
        raise SpqtError("the prompt is empty")
    if len(prompt) + args.n > loaded.config.max_seq_len:
        raise SpqtError(f"prompt ({len(prompt)} tokens) plus -n {args.n} exceed the model's context of "
                        f"{loaded.config.max_seq_len} tokens")
    run = _decoder(args, loaded, device, dtype, backend, max_len=len(prompt) + args.n)
    gen, criterion, mode = run.generator, run.criterion, run.mode
    shown = [""]
    produced: list[int] = []
    stops = tok.stop_ids

    def stream(token_id: int) -> None:
        if token_id in stops:  # the end token ends the text; its own text ("<|im_end|>", "</s>") is not the answer's
            return
        produced.append(token_id)
        text = tok.decode(produced)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown[0]):])
            sys.stdout.flush()
            shown[0] = text

    try:
        result = gen.generate(prompt, args.n, sampling, stop_ids=stops, on_token=stream, track=run.track)
    except KeyboardInterrupt:  # Ctrl-C: the text's line ends, as at the end, before main's `spqt: interrupted`
        if shown[0]:
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    text = tok.decode(produced)
    sys.stdout.write(text[len(shown[0]):] + "\n")  # an unfinished character at the end, then the line
    sys.stdout.flush()
    if structured and result.finish_reason == "length":
        print(f"spqt: note: -n {args.n} ended the answer before its grammar was complete", file=sys.stderr)
    first = f" (first step {1e3 * result.step_seconds[0]:.0f} ms)" if result.step_seconds else ""
    seed = f" | seed {sampling.seed}" if args.temperature > 0 else ""  # (as llama.cpp's: a sampled text repeats)
    print(f"prompt: {result.prompt_tokens} tokens, {result.prefill_tokens_per_s:.1f} tokens/s | "
          f"decode: {len(result.tokens)} tokens, {result.decode_tokens_per_s:.1f} tokens/s{first}{seed}",
          file=sys.stderr)
    if result.sparsity:
        parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.sparsity.items())
        print(f"achieved sparsity (target {100 * run.sparsity:g}%): {parts}", file=sys.stderr)
    if args.json:
        from spqt.checkpoint import atomic_write

        record = {"model": str(args.model or "default"), "kind": loaded.kind, "device": gen.device,
                  "prompt": prompt_text, "chat": args.chat, "system": args.system,
                  "thinking_budget": args.thinking_budget, "text": text,
                  "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.tokens),
                  "prefill_seconds": result.prefill_seconds, "decode_seconds": result.decode_seconds,
                  "prefill_tokens_per_s": result.prefill_tokens_per_s,
                  "decode_tokens_per_s": result.decode_tokens_per_s,
                  "target_sparsity": run.sparsity, "mode": mode if run.sparsity else "dense",
                  "criterion": criterion if run.sparsity else None,
                  "achieved_sparsity": result.sparsity or None, "one_launch_route": run.kept,
                  "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                               "seed": sampling.seed if args.temperature > 0 else None, "min_p": args.min_p,
                               "repeat_penalty": args.repeat_penalty,
                               "frequency_penalty": args.frequency_penalty,
                               "presence_penalty": args.presence_penalty},
                  "structured_output": dict(zip(("kind", "text"), structured)) if structured else None,
                  "finish_reason": result.finish_reason}
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    return 0


def _check_thinking_budget(tok, loaded) -> None:
    """generate's and chat's --thinking-budget, before the first answer (reasoning.budget_bounds): a note where the
    template writes no thinking (nothing to bound); SpqtError where it cannot be kept."""
    from spqt.serve.reasoning import budget_bounds

    if not budget_bounds(tok, loaded.config.vocab_size, "--thinking-budget"):
        print("spqt: note: this model's chat template writes no thinking: --thinking-budget bounds nothing",
              file=sys.stderr)


def cmd_chat(args) -> int:
    from spqt import chat
    from spqt.tokenizer import TextTokenizer

    _check_decoding(args)
    sampling = _sampling(args)
    device, dtype, backend = _runtime(args)
    loaded = _load(args)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    if args.thinking_budget is not None:
        _check_thinking_budget(tok, loaded)
    chat.check_template(tok, args.system)  # before the Generator and its model line: one error line
    ctx = args.ctx or loaded.config.max_seq_len
    if ctx > loaded.config.max_seq_len:
        raise SpqtError(f"--ctx {ctx} exceeds the model's context of {loaded.config.max_seq_len} tokens")
    chat.check_room(args.n, ctx)
    run = _decoder(args, loaded, device, dtype, backend, max_len=ctx, label=not args.quiet)
    if run.generator.device == "cuda":  # the rests after a reused prefix run in graphs captured now, as serve's
        start = time.perf_counter()  # (Generator._reuse_pays: on CUDA a turn reuses the cache only through them)
        run.generator.capture_prefills(ctx - 1, suffixes=True)
        if not args.quiet:
            print(f"[prefill graphs captured in {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
    session = chat.Chat(run.generator, tok, sampling, args.n, system=args.system, track=run.track,
                        thinking_budget=args.thinking_budget)
    stdin = sys.stdin or io.StringIO()  # stdin closed (`<&-`, Python's None): the end of the input at once
    interactive = stdin.isatty()
    if interactive:
        print("spqt chat: /help lists the commands; /exit or Ctrl-D ends it", file=sys.stderr, flush=True)
    read = chat.line_reader(stdin, interactive, sys.stdout.isatty(), sys.stderr)
    return chat.run(session, read, sys.stdout, sys.stderr, stats=not args.quiet, terminal=interactive)


def check_origins(origins: list[str]) -> tuple[str, ...]:
    """--allow-origin's values: "*", or scheme://host[:port] as a browser sends it in Origin (no path, no trailing
    slash, which would never match); SpqtError otherwise."""
    from urllib.parse import urlsplit

    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query
                              or parts.fragment or origin != f"{parts.scheme}://{parts.netloc}"):
            raise SpqtError(f"--allow-origin takes * or an origin as a browser sends it, scheme://host[:port] "
                            f"(e.g. http://localhost:3000), got {origin!r}")
    return tuple(origins)


def cmd_serve(args) -> int:
    import os

    from spqt.generate import resolve_device
    from spqt.serve.engine import Engine, parse_sparsity
    from spqt.serve.response_store import DEFAULT_CAPACITY
    from spqt.serve.server import bind, serve, setup_logging
    from spqt import hub
    from spqt.sources import model_name

    sparsity = parse_sparsity(args.sparsity)
    if args.criterion:
        from spqt.sparsity import check_criterion

        check_criterion(args.criterion)  # before the (slow) load
    if not 0 <= args.port < 65536:
        raise SpqtError(f"--port must be in [0, 65535], got {args.port}")
    allow_origins = check_origins(args.allow_origin)
    device = resolve_device(args.device)
    dtype = _dtype(args.dtype, device)  # (an unknown name before the load)
    sock = bind(args.host, args.port)  # before the (slow) load, so a taken port fails at once
    try:
        setup_logging()
        path = _model_path(args.model)
        loaded = _load(args, path)
        # e.g. SmolLM2-135M-Instruct.q4_k-zigzag.v2; a hub model's: its file's name, a checkpoint's its repo's
        name = args.name or (hub.served_name(args.model, path) if hub.is_hub_name(args.model) else
                             model_name(args.model or loaded.path))
        engine = Engine(loaded, device, sparsity, args.mode, args.ctx, name, criterion=args.criterion,
                        backend=_gemv_backend(args.gemv, device),
                        prompt_cache={"on": True, "off": False}.get(args.prompt_cache),
                        dense_fallback=not args.no_dense_fallback, dtype=dtype,
                        reasoning_format=args.reasoning_format, thinking_budget=args.thinking_budget)
        serve(engine, sock, args.api_key or os.environ.get("SPQT_API_KEY") or None, allow_origins,
              DEFAULT_CAPACITY if args.responses_store is None else args.responses_store)
    finally:
        sock.close()
    return 0


def cmd_perplexity(args) -> int:
    from spqt.evaluate import perplexities
    from spqt.generate import Generator, resolve_device
    from spqt.sparsity import check_sparsity
    from spqt.tokenizer import TextTokenizer

    levels = args.sparsity
    for s in levels:
        check_sparsity(s)
    _check_outputs([("--json", args.json)], [("model", _model_file(args.model)), ("--data file", args.data),
                                              ("--thresholds file", args.thresholds)])
    data = Path(args.data)
    text = _read_text(data)
    if args.json:
        from spqt.checkpoint import check_writable

        check_writable(Path(args.json))  # before the (slow) evaluation
    device = resolve_device(args.device)
    loaded = _load(args)
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    # as llama-perplexity reads and tokenizes -f: one trailing newline dropped, BOS first where the model adds one (so
    # the chunks hold llama-perplexity's tokens, not one token later in the text), special tokens' texts as text
    tokens = tok.encode(text.removesuffix("\n"), special=False)
    bos = loaded.config.bos_id if loaded.config.add_bos else None
    batch = args.batch or (16 if device == "cuda" else 1)
    rows = []
    criterion = _criterion(args, loaded)
    # A sparsity row measures the sparse model: maps whose sparse kernel would not be faster still
    # run sparse here (the dense fallback is a speed choice of generate, not of accuracy).
    gen = Generator(loaded, device, dtype=_dtype(args.dtype, device), max_len=args.ctx, criterion=criterion,
                    dense_fallback=False)
    from spqt.sparsity import default_mode

    mode = args.mode or default_mode(loaded.thresholds, criterion)
    # every level in one pass over the text: each chunk's dense first half prefilled once (evaluate.perplexities)
    settings = [lambda s=s: gen.set_sparsity(s, mode, criterion=criterion) for s in levels]
    results = perplexities(gen, tokens, settings, ctx=args.ctx, method=args.method, chunks=args.chunks, batch=batch,
                           bos_id=bos, progress=True)
    for s, r in zip(levels, results):
        rows.append({"sparsity": s, "mode": mode if s else "dense", "criterion": criterion if s else "dense",
                     "ppl": r.ppl, "scored_tokens": r.scored,
                     "chunks": r.chunks, "achieved": r.achieved})
    print(f"\n{'target':>7s} {'criterion':>9s} {'mode':>8s} {'ppl':>10s} {'achieved':>9s} {'qkv':>6s} {'o':>6s} "
          f"{'gate_up':>8s} {'down':>6s}   (achieved: fraction of thresholded weights skipped; per input: of entries)")
    for row in rows:
        a = row["achieved"]
        print(f"{100 * row['sparsity']:6.0f}% {row['criterion']:>9s} {row['mode']:>8s} {row['ppl']:10.4f} {100 * a.get('all', 0):8.1f}% "
              + " ".join(f"{100 * a.get(k, 0):{w}.1f}" for k, w in (("qkv", 6), ("o", 6), ("gate_up", 8), ("down", 6))))
    done = results[0]
    print(f"{done.chunks} chunk{'s' if done.chunks != 1 else ''} of {args.ctx} tokens, {done.scored} tokens scored"
          + (f" (--chunks {args.chunks}: the text has only {done.chunks})" if (args.chunks or 0) > done.chunks else ""))
    if args.json:
        from spqt.checkpoint import atomic_write

        report = {"model": str(args.model or "default"), "kind": loaded.kind, "data": str(data),
                  "method": args.method, "ctx": args.ctx, "device": device, "dtype": args.dtype,
                  "tokens": len(tokens), "results": rows, "provenance": loaded.provenance}
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    return 0


def _calibration_drops(thresholds: dict, criterion: str, modes, levels) -> str:
    """The criterion's thresholds a calibration of `modes` at `levels` drops (merge replaces a criterion's whole
    entry), as "greedy 0.25, 0.4; unified 0.65"; empty where it drops none."""
    from spqt import sparsity as sp

    old = sp.mode_tables(thresholds, criterion)
    new = {sp.level_key(s) for s in levels}
    lost = {m: sorted(k for k in t if m not in modes or k not in new) for m, t in old.items()}
    return "; ".join(f"{m} {', '.join(keys)}" for m, keys in sorted(lost.items()) if keys)


def cmd_calibrate(args) -> int:
    from spqt import hub, sparsity as sp
    from spqt.calibrate import calibrate, check_levels, check_text, merge
    from spqt.generate import resolve_device
    from spqt.checkpoint import atomic_write, check_writable, load_model, save_spqt
    from spqt.tokenizer import TextTokenizer

    # the model is read, then written in place or to -o (-o naming the model itself is the in-place default)
    _check_outputs([("--json", args.json), ("-o", args.output)], [("--data file", f) for f in args.data])
    _check_outputs([("--json", args.json)], [("model", _model_file(args.model))])
    texts = [_read_text(f) for f in args.data]
    modes = sp.CALIBRATE_MODES[args.mode]
    criterion = sp.check_criterion(args.criterion)
    check_levels(args.sparsity, modes)  # before the load and the note on what the calibration drops
    if args.greedy_step is not None and not 0 < args.greedy_step <= 0.25:
        raise SpqtError("--greedy-step must be in (0, 0.25]")
    if args.held_out_tokens < 0 or 0 < args.held_out_tokens < 4:  # (perplexity's shortest chunk: 4 tokens)
        raise SpqtError(f"--held-out-tokens must be 0 (no held-out check) or at least 4, got {args.held_out_tokens}")
    if args.output:
        _check_spqt_name("-o", Path(args.output))
    for out in (args.output, args.json):  # before the (slow) calibration
        if out:
            check_writable(Path(out))
    device = resolve_device(args.device)
    loaded = load_model(_model_path(args.model))
    if loaded.kind == "float" and (args.output or not args.json):
        raise SpqtError("thresholds live in a .spqt file: quantize the model first, or pass --json (without -o) to "
                        "write them alone")
    if loaded.kind != "float" and hub.is_hub_name(args.model) and not args.output:
        raise SpqtError("a hub model's file lives in huggingface_hub's cache: write the calibrated model with -o")
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    tokens: list[int] = []
    for text in texts:  # each file tokenized on its own, then concatenated in the order given
        tokens += tok.encode(text, add_bos=False)
    check_text(loaded, tokens, args.held_out_tokens)
    dropped = _calibration_drops(loaded.thresholds, criterion, modes, args.sparsity)
    if dropped:  # before the (slow) calibration, so the user can stop it
        print(f"spqt: note: this replaces the model's {criterion} thresholds, dropping {dropped}; pass every level "
              f"and mode to keep (--sparsity, --mode)", file=sys.stderr, flush=True)
    result = calibrate(loaded, tokens, args.sparsity, modes, device, max_tokens=args.tokens,
                       greedy_tokens=args.greedy_tokens, progress=True, criterion=criterion,
                       held_out_tokens=args.held_out_tokens, **({"step": args.greedy_step} if args.greedy_step else {}))
    thresholds = merge(loaded.thresholds, result)
    rec = thresholds.get("recommended")
    if not args.held_out_tokens:
        kept = rec and rec.get("criterion") and rec["criterion"] != criterion
        print(f"\nno held-out check (--held-out-tokens 0): no recommended {criterion} level from this run"
              + (f" (the model keeps its {rec['criterion']} {rec['mode']} {rec['sparsity']:g} recommendation)"
                 if kept else ""))
    elif rec and rec.get("held_out"):
        print(f"\nheld-out calibration text ({rec['held_out_tokens']} tokens), perplexity vs dense {rec['dense_ppl']:.3f}:")
        print(f"{'criterion':>9s} {'mode':>8s} {'target':>7s} {'achieved':>9s} {'ppl':>9s} {'vs dense':>9s}")
        for r in rec["held_out"]:
            print(f"{r['criterion']:>9s} {r['mode']:>8s} {100 * r['sparsity']:6.0f}% {100 * r.get('achieved', float('nan')):8.1f}% "
                  f"{r['ppl']:9.3f} {100 * (r['ppl'] / rec['dense_ppl'] - 1):+8.1f}%")
        print(f"recommended (highest level within +{100 * rec['max_loss']:g} %): "
              + (f"{rec['criterion']} {rec['mode']} {rec['sparsity']:g}" if rec["criterion"] else "dense (no level qualifies)"))
    if args.json:
        doc = {"n_layers": loaded.config.n_layers, "dim": loaded.config.dim, "data": [Path(f).name for f in args.data],
               "thresholds": thresholds}
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))
        print(f"wrote {args.json}")
    if loaded.kind != "float":
        loaded.thresholds = thresholds
        target = Path(args.output) if args.output else loaded.path
        save_spqt(loaded, target)
        print(f"wrote {criterion} thresholds ({', '.join(modes)}: {', '.join(f'{s:g}' for s in args.sparsity)}) into {target}")
    return 0


def cmd_bench(args) -> int:
    from spqt.bench import GEMV_TYPES

    types = [t.lower() for t in _listed(args.types)]
    unknown = [t for t in types if t not in GEMV_TYPES]
    if unknown or not types:
        raise SpqtError(f"unknown weight types {unknown}; choose from {', '.join(GEMV_TYPES)}")
    args.types = ",".join(types)
    _dtype(args.dtype, "cuda")  # an unknown one: its error line before anything runs
    if args.what == "gemv" and args.dtype != "auto":
        raise SpqtError("--dtype is for spqt bench decode (the GEMV table times fp16 inputs)")
    if args.what == "gemv" and args.after_capture:
        raise SpqtError("--after-capture is for spqt bench decode (the GEMV table times kernels, not a decode step)")
    if args.what == "decode" and args.plot:
        raise SpqtError("--plot is for spqt bench gemv (its speedup against sparsity)")
    _check_outputs([("--json", args.json), ("--plot", args.plot)],
                   [("model", args.model)] if args.what == "decode" else [])
    from spqt.checkpoint import check_writable

    for out in (args.json, args.plot):
        if out:
            check_writable(Path(out))  # before minutes of timing
    _require_cuda("spqt bench")
    for s in args.sparsity:
        if not 0 <= s < 1:
            raise SpqtError(f"sparsity must be in [0, 1), got {s}")
    if args.what == "gemv":
        from spqt.bench import VARIANTS, parse_shapes, run_gemv_benchmark

        variants = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SpqtError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
        run_gemv_benchmark(parse_shapes(args.shapes), args.sparsity, variants, args.json, args.plot, types=types)
        return 0
    from spqt.bench_decode import run_decode_benchmark

    run_decode_benchmark(args, args.json)
    return 0


def _require_cuda(command: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SpqtError(f"{command} needs a CUDA GPU; this machine has none")


def _listed(value: str) -> list[str]:
    """A comma-separated option's items, stripped, empty ones left out."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _synthetic_models(value: str, flag: str) -> list[str]:
    """The synthetic models (synthetic:NAME, comma-separated) a step-judged tune option names; one clear error
    otherwise, before any timing."""
    from spqt.bench_decode import SYNTHETIC

    models = _listed(value)
    if not models or any(not m.startswith("synthetic:") or m.split(":", 1)[1] not in SYNTHETIC for m in models):
        raise SpqtError(f"{flag} needs synthetic models (synthetic:NAME, comma-separated, NAME one of "
                        f"{', '.join(SYNTHETIC)}); got {value!r}")
    return models


TUNE_SHAPES = "llama2-7b,llama3-8b,llama2-13b,llama2-70b,runtime"  # spqt tune's --shapes by default


def _tune_shapes(args) -> list[tuple[int, int]]:
    """spqt tune's shapes: --shapes, else TUNE_SHAPES; a model name gives its maps as the runtime runs them too."""
    from spqt.bench import parse_shapes

    return parse_shapes(args.shapes if args.shapes is not None else TUNE_SHAPES, runtime_maps=True)


def _tune_files(args, names: list[str]) -> dict[str, str]:
    """spqt tune's model arguments (.spqt files, hub names) -> their files: a hub name's downloaded (spqt.hub) after the
    GPU check (not minutes of download before that error), and refused as the --output table's path (the table would
    replace the model in huggingface_hub's cache); a file as given."""
    from spqt import hub

    hub_names = [n for n in names if hub.is_hub_name(n)]
    if hub_names:
        _require_cuda("spqt tune")
    files = {n: str(_model_path(n)) if hub.is_hub_name(n) else n for n in names}
    _check_outputs([("--output", args.output)], [("model", files[n]) for n in hub_names])
    return files


def _model_tune_plan(args, names: list[str]) -> tuple[dict | None, dict[str, str]]:
    """spqt tune --model's plan of its models `names` (.spqt files or hub names; bench.model_tune_plan: {(fmt,
    variants): shapes}) after its checks, and their files (_tune_files); (None, {}) without --model. One clear error,
    before any timing, for a bad use or a model with nothing to tune."""
    from spqt.bench import model_tune_plan

    if args.model is None:
        if args.retune:
            raise SpqtError("--retune goes with --model")
        return None, {}
    if args.shapes is not None or args.types is not None:
        raise SpqtError("--model takes the shapes and types from the models: leave out --shapes and --types")
    if args.crossover_only or args.cuda_against_table or any(
            v is not None for v in (args.routes, args.l2first, args.pairs)):
        raise SpqtError("--model tunes the kernels of the models' maps; --crossover-only, --cuda-against-table, "
                        "--routes, --l2first and --pairs are runs of their own")
    if not names:
        raise SpqtError("--model needs .spqt files or hf:ORG/REPO[:TAG] names, comma-separated")
    files = _tune_files(args, names)
    plan = model_tune_plan(list(files.values()), list(files))
    if not plan:
        raise SpqtError(f"{args.model}: no maps on the tuned kernels (zigzag maps, Q4_K row maps); the other types' "
                        "row maps run dequantize + cuBLAS")
    return plan, files


def _check_table_writable(table: Path, hint: str) -> None:
    """SpqtError (its message ending in hint) where spqt tune could not write its table: a folder on the way that is a
    file, or one where no file can be made; the missing folders are made (as save_table makes them)."""
    from spqt.checkpoint import check_writable

    folder = table.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise SpqtError(f"cannot write {table}: {folder} is not a folder{hint}")
    try:
        table.parent.mkdir(parents=True, exist_ok=True)
        check_writable(table)
    except OSError as e:
        raise SpqtError(f"cannot write {table}: {e.strerror or e}{hint}") from None
    except SpqtError as e:
        raise SpqtError(f"{e}{hint}") from None


def cmd_tune(args) -> int:
    from spqt.bench import GEMV_TYPES, parse_shapes, tune, tune_crossover, tune_types
    from spqt.kernels import tuning

    names = _listed(args.model or "")  # --model's models
    _check_outputs([("--output", args.output)], [("model", _model_file(n)) for n in names])
    plan, files = _model_tune_plan(args, names)
    types = [t.lower() for t in _listed(args.types if args.types is not None else "q4_k")]
    if not types or any(t not in GEMV_TYPES for t in types):
        raise SpqtError(f"unknown GEMV types in {args.types!r}; choose from {', '.join(GEMV_TYPES)}")
    if args.types is not None and (args.cuda_against_table or args.l2first is not None or args.pairs is not None):
        raise SpqtError("--types picks the types of a kernel tune, of --crossover-only and of --routes' synthetic "
                        "models; --cuda-against-table, --l2first and --pairs judge Q4_K's entries")
    if args.shapes is not None and not parse_shapes(args.shapes, runtime_maps=True):
        raise SpqtError(f"--shapes needs NxK or names, comma-separated; got {args.shapes!r}")
    models = _listed(args.routes or "")
    if args.routes is not None and (not models or not args.route_levels or args.route_rounds < 1
                                    or any(not 0 < level < 1 for level in args.route_levels)):
        raise SpqtError(f"--routes needs models (synthetic:NAME, .spqt files or hf:ORG/REPO[:TAG] names, "
                        f"comma-separated), --route-levels in (0, 1) and --route-rounds of 1 or more; got "
                        f"{args.routes!r} at {','.join(map(str, args.route_levels))}, {args.route_rounds} rounds")
    route_runs = []  # (model or its file, its weight types: the routes' key), a file checked before any timing
    route_files = _tune_files(args, [m for m in models if not m.startswith("synthetic:")])
    for m in models:
        if m.startswith("synthetic:"):
            route_runs += [(m, fmt) for fmt in types]
            continue
        from spqt.checkpoint import kind_types, spqt_maps

        kind = spqt_maps(route_files[m]).kind
        if not kind.endswith("-zigzag"):
            raise SpqtError(f"spqt tune --routes: {m} is {kind}, not a zigzag model (MODE_KEPT runs on zigzag maps)")
        if args.types is not None:
            raise SpqtError(f"spqt tune --routes: {m} brings its own types ({kind}); --types is for synthetic models")
        route_runs.append((route_files[m], kind_types(kind)[0]))
    _require_cuda("spqt tune")
    # the setting judged in whole decode steps of synthetic models, if any: (flag, its models)
    step_judged = [(flag, _synthetic_models(value, flag)) for flag, value in (("--l2first", args.l2first),
                                                                              ("--pairs", args.pairs))
                   if value is not None]
    if sum(map(bool, (args.crossover_only, args.cuda_against_table, args.routes is not None))) + len(step_judged) > 1:
        raise SpqtError("--crossover-only, --cuda-against-table, --routes, --l2first and --pairs exclude each other")
    table = Path(args.output) if args.output else tuning.user_table_path()
    nothing_to_time = (plan is not None and not args.retune and not step_judged and args.routes is None
                       and not args.crossover_only and not args.cuda_against_table and not tuning.untuned(plan))
    if not nothing_to_time:  # said before minutes of timing, not after
        _check_table_writable(table, "" if args.output else
                              " (this GPU's user table: set SPQT_TUNED to a writable folder, or pass --output "
                              "TABLE.json)")
    routes = dict(tuning.table_entries(tuning.STEP_ROUTES))
    prefetching = {shape for shape, e in tuning.table_entries("zigzag_dense").items() if e.get("l2first")}
    step_paired = {shape for shape, e in tuning.table_entries("zigzag_dense").items() if e.get("pairs_step_us")}
    if step_judged:
        from spqt import bench_decode

        (flag, judged_models), = step_judged
        judge, update, key = {"--l2first": (bench_decode.tune_l2first, tuning.with_prefetch, "l2first"),
                              "--pairs": (bench_decode.tune_pairs, tuning.with_pairs, "pairs")}[flag]
        entries = tuning.all_entries()
        for shape, judged in judge(judged_models).items():
            entries["zigzag_dense"][shape] = update(entries["zigzag_dense"][shape], judged[key], judged["step_us"])
        entries = {v: e for v, e in entries.items() if e} | ({tuning.STEP_ROUTES: routes} if routes else {})
    elif args.routes is not None:
        from spqt.bench_decode import tune_routes

        entries = tuning.all_entries()
        named = {file: m for m, file in route_files.items()}
        for key, entry in tune_routes(args, route_runs, args.route_levels, args.route_rounds).items():
            entry["model"] = named.get(entry["model"], entry["model"])  # (a hub model's name, not its cached file)
            timed = routes.get(key, {}).get("levels", {})
            routes[key] = {**entry, "levels": {**timed, **entry["levels"]}}
        entries = {v: e for v, e in entries.items() if e} | {tuning.STEP_ROUTES: routes}
    elif args.crossover_only:
        entries = tune_crossover(_tune_shapes(args), types=types)
    elif args.cuda_against_table:
        from spqt.kernels import zigzag_cuda

        if not zigzag_cuda.usable():
            raise SpqtError("--cuda-against-table needs an sm_80+ GPU and NVRTC (pip install 'spqt[cuda]')")
        shapes = _tune_shapes(args)
        entries = tuning.all_entries()
        fallbacks = {(v, f"{n}x{k}"): tuning.triton_config(v, n, k) for v in ("zigzag_dense", "zigzag_sparse")
                     for n, k in shapes}
        found = tune(shapes, variants=("zigzag_dense", "zigzag_sparse"), candidates=tuning.table_and_cuda_candidates)
        for variant, by_shape in found.items():
            for key, entry in by_shape.items():
                if entry.get("impl") == "cuda":  # what a machine without the CUDA GEMV runs instead
                    entry["fallback"] = fallbacks[variant, key]
            entries[variant].update(by_shape)
    else:
        # each (type, shape) timed here replaces its entries; the table's other shapes and types keep theirs
        if plan is None:
            shapes = _tune_shapes(args)
            plan = {("q4_k", tuning.VARIANTS) if fmt == "q4_k" else
                    (fmt, (f"zigzag_dense_{fmt}", f"zigzag_sparse_{fmt}")): shapes for fmt in types}
        elif not args.retune:
            timed = plan
            plan = tuning.untuned(plan)
            if not plan:
                print(f"spqt: every map of {args.model} has entries of its own in this GPU's table "
                      f"({tuning.table_source()['path']}); --retune times them again", file=sys.stderr)
                return 0
            if plan != timed:
                print("spqt: note: the maps that have entries of their own keep them (--retune times them again)",
                      file=sys.stderr)
        if args.model is not None:
            print("spqt: tuning " + "; ".join(f"{fmt} {'/'.join(variants)} on {', '.join(f'{n}x{k}' for n, k in s)}"
                                              for (fmt, variants), s in plan.items()), file=sys.stderr)
        entries = tuning.all_entries()
        for (fmt, variants), shapes in plan.items():
            if fmt == "q4_k":
                found = tune(shapes, variants=variants)
            else:
                found = tune_types(shapes, [fmt], kinds=tuple(v.split("_")[1] for v in variants))
            for variant, by_shape in found.items():
                for key, entry in by_shape.items():
                    old = entries.setdefault(variant, {}).get(key)
                    if fmt == "q4_k" and entry.get("impl") == "cuda" and "fallback" not in entry:
                        # what a machine without the CUDA GEMV runs instead: the table's Triton config of the shape
                        n, k = map(int, key.split("x"))
                        entry = dict(entry, fallback=tuning.triton_config(variant, n, k))
                    if fmt != "q4_k" and entry.get("impl") != "cuda" and old and old.get("impl") == "cuda":
                        # the Triton type kernel timed (no CUDA GEMV here, or SPQT_GEMV=triton): the CUDA entry stays,
                        # this becomes what runs where the CUDA GEMV cannot
                        entries[variant][key] = dict(old, fallback={k: v for k, v in entry.items() if k != "us"})
                    else:
                        entries[variant][key] = entry
        entries = {v: e for v, e in entries.items() if e}
    if args.routes is None and not step_judged and routes:
        # a route stays where none of its model's maps runs another config now (dense or sparse: the entry of its
        # shape, or the neighbour's it borrows; crossovers included, the timings not)
        before = {v: tuning.table_entries(v) for v in tuning.VARIANTS + tuning.TYPE_VARIANTS}  # (a type's route
        # also depends on its type's entries: tuning.route_touched)
        stale = sorted(key for key in routes if tuning.route_touched(key, before, entries))
        if stale:
            print(f"spqt: note: the decode-step routes of {', '.join(stale)} were timed with the old kernel entries "
                  "and are dropped; spqt tune --routes times them again", file=sys.stderr)
        kept = {key: entry for key, entry in routes.items() if key not in stale}
        entries = {v: e for v, e in entries.items() if v != tuning.STEP_ROUTES} | (
            {tuning.STEP_ROUTES: kept} if kept else {})
    # (--l2first may judge a depth 0 and remove it; --pairs keeps the depths)
    dropped = [] if args.l2first is not None else sorted(
        shape for shape in prefetching if not entries.get("zigzag_dense", {}).get(shape, {}).get("l2first"))
    if dropped:
        print(f"spqt: note: the L2 prefetch depths of the shapes whose entries this replaced ({', '.join(dropped)}) "
              "are dropped; spqt tune --l2first judges them again", file=sys.stderr)
    # (--pairs and --l2first keep every entry's pairs step timings: nothing replaced there)
    replaced = sorted(shape for shape in step_paired
                      if not entries.get("zigzag_dense", {}).get(shape, {}).get("pairs_step_us"))
    if replaced:
        print(f"spqt: note: the tile pairs judged in whole decode steps of {', '.join(replaced)} are replaced by "
              "this tune's choice; spqt tune --pairs judges them again", file=sys.stderr)
    path = tuning.save_table(entries, path=table)  # (atomic_write: a failing write is one SpqtError line)
    print(f"wrote {path}")
    if args.model is not None:
        from spqt.checkpoint import spqt_maps

        zigzag = [m for m, file in files.items() if spqt_maps(file).kind.endswith("-zigzag")]
        if zigzag:
            print(f"spqt: note: spqt tune --routes {','.join(zigzag)} then times the decode step's sparse routes "
                  "per level" + (f" (it times against the table in use: copy {path} to {tuning.user_table_path()} "
                                 "first)" if args.output else ""), file=sys.stderr)
    return 0


GEMV_CHOICES = ("auto", "native", "fp16", "fp32")  # --gemv of generate and serve (_gemv_backend)


def _gemv_backend(name: str, device: str) -> str | None:
    """The linear maps' backend for a --gemv choice: on the CPU, native (the default: zigzag K-quant
    and Q8_0 blocks read as stored and an fp16 head, in C compiled on first use; kernels/cpu_native.py),
    fp16 (an fp16 copy of the weights, fp32 sums; auto falls back to it, with a note, where no C
    compiler works) or the fp32 reference; on CUDA the kernels decide (None)."""
    if device == "cuda":
        if name != "auto":
            raise SpqtError("--gemv chooses the CPU's GEMV; on CUDA the Triton kernels run")
        return None
    if name == "fp32":
        return "reference"
    if name == "fp16":
        return "cpu-fp16"
    from spqt.kernels import cpu_native

    why = cpu_native.available()
    if why is None:
        return "cpu-native"
    if name == "native":
        raise SpqtError(f"--gemv native cannot run here: {why}")
    print(f"spqt: note: the native CPU GEMV cannot run here ({why}); using the fp16 GEMV", file=sys.stderr)
    return "cpu-fp16"


DTYPE_HELP = "compute dtype: auto (fp16 on CUDA, bf16 there for Gemma 2 and 3, GLM-4, OLMo 2 and 3, EXAONE 4.0, " \
             "ERNIE 4.5 and Seed-OSS; fp32 on the CPU), fp32, fp16, bf16"


def _dtype(name: str, device: str):
    """The compute dtype for a --dtype choice: auto is None, the model's (generate.default_dtype: fp32 on the CPU,
    whose speed comes from the GEMV's own types, --gemv; fp16 on CUDA, bf16 for generate.BF16_FAMILIES)."""
    from spqt.generate import compute_dtype

    return compute_dtype(name)


# ---------------------------------------------------------------- parser


def sp_default_criterion() -> str:
    from spqt.sparsity import DEFAULT_CRITERION

    return DEFAULT_CRITERION


def _add_model_options(p) -> None:
    p.add_argument("model", nargs="?", help=".spqt, .gguf, HF folder or hf:ORG/REPO[:QUANT] (the Hugging Face Hub; "
                   "default: SmolLM2-135M-Instruct)")


def _add_sparsity_options(p) -> None:
    """generate's and chat's --sparsity, --mode, --criterion, --device, --thresholds, --no-dense-fallback (_decoder
    reads them)."""
    p.add_argument("--sparsity", type=_level, default=0.0,
                   help="target activation sparsity in [0, 1), or auto: the level spqt calibrate recommended")
    p.add_argument("--mode", choices=["unified", "greedy", "global"], default=None,
                   help="which calibrated thresholds (default greedy where the model has them, else unified; "
                        "with --sparsity auto the recommended)")
    p.add_argument("--criterion", default=None, help="teal or wina (default: the model's recommended, else teal)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--thresholds", help="thresholds JSON from spqt calibrate --json (instead of the model's own)")
    p.add_argument("--no-dense-fallback", action="store_true",
                   help="run every map sparse, also where its sparse kernel is slower than dense (below the GPU's "
                        "tuned crossover, below 50 %% on the CPU, at any level on the CPU's fp16 GEMV)")


def _add_sampling_options(p) -> None:
    """generate's and chat's sampling options (_sampling reads them)."""
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 or -1 = off, the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None,
                   help="the sampler's seed: the same seed, options and prompt give the same text (default: a random "
                        "one, which generate's --json records)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below this share of the most likely one's "
                   "probability (0 = off, the default)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="divide a positive logit (multiply a negative one) of a token the prompt or the answer "
                        "holds by this, over all of them (1 = off, the default)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this from a token's logit for each time the answer holds it, in [-2, 2] (0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of each token the answer holds, in [-2, 2] (0 = off). The "
                        "penalties apply greedy too; on CUDA a greedy step then reads its logits on the host")


def _add_runtime_options(p) -> None:
    """generate's and chat's --dtype and --gemv (_runtime reads them, with --device)."""
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--gemv", choices=GEMV_CHOICES, default="auto",
                   help="CPU matrix-vector products: native (auto's choice: zigzag blocks as stored, in C compiled "
                        "on first use), fp16 (an fp16 copy of the weights, fp32 sums) or fp32 (the torch reference)")


def build_parser() -> argparse.ArgumentParser:
    from spqt import __version__
    from spqt.sparsity import CALIBRATE_MODES

    parser = argparse.ArgumentParser(prog="spqt", description="Activation-sparse decoding on K-quantized weights.")
    parser.add_argument("--version", action="version", version=f"spqt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="convert a GGUF file or HF checkpoint folder to a .spqt model")
    p.add_argument("source", help="a .gguf file, a Hugging Face checkpoint folder, or hf:ORG/REPO[:QUANT] (either, "
                   "from the Hugging Face Hub)")
    p.add_argument("-o", "--output", required=True, help="the .spqt file to write")
    p.add_argument("--layout", choices=["zigzag", "row"], default="zigzag",
                   help="zigzag (default: each block runs down a column, so a skipped input skips its blocks) or "
                        "row (llama.cpp's: each block runs along a row; on CUDA the B0 kernel)")
    p.add_argument("--type", default="q4_k",
                   help="q8_0, q6_k, q5_k, q4_k (default), q3_k, q2_k, or a llama.cpp-style mix: q4_k_m, q5_k_m, q3_k_m, "
                        "q4_k_s, q5_k_s, q3_k_s, q3_k_l")
    p.add_argument("--search", default="reference",
                   help="the encoder's search: reference (default; llama.cpp's quantize_row_*_ref, same bytes) "
                        "or mse (Q4_K and Q5_K matrices: a search for the lowest plain squared error per block, "
                        "never above the reference's; ~5.5 %% lower RMSE on zigzag Q5_K; 4-8x the encoding "
                        "time on the CPU; a mix's other types keep the reference)")
    p.add_argument("--head", default="auto",
                   help="the output head's type: auto (default; llama.cpp's recipe: q6_k, q8_0 in a q8_0 model), fp16, "
                        "or a type; a head tied to the embedding stays fp16 unless a type is named (a quantized copy "
                        "beside the fp16 embedding)")
    p.add_argument("--gptq", nargs="+", metavar="TEXT",
                   help="calibration text files (never the evaluation text): quantize every layer's maps with their "
                        "errors compensated on the model's own inputs from this text (GPTQ, act order in zigzag); "
                        "other bytes than llama.cpp's, the same formats; the head keeps the plain encoder; with "
                        "--search mse, each batch's scales come from that search)")
    p.add_argument("--gptq-tokens", type=_at_least(512), default=None,
                   help="calibration tokens for --gptq (whole windows of 512; default 32768)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda or auto (cuda when present; same bytes with the reference search)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("inspect", help="describe a model file")
    p.add_argument("model", help=".spqt, .gguf, HF folder or hf:ORG/REPO[:QUANT]")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate text: the text alone on stdout, everything else on stderr")
    _add_model_options(p)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("-p", "--prompt")
    given.add_argument("-f", "--file", help="the prompt from this text file (UTF-8; - reads standard input); one "
                       "trailing newline is dropped, as llama.cpp drops it")
    p.add_argument("-n", type=int, default=128, help="new tokens (default 128)")
    _add_sparsity_options(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (one turn; "
                   "spqt chat holds a conversation)")
    p.add_argument("--system", default=None, help="with --chat: the system message before the prompt (default: "
                   "the template's own, if any)")
    p.add_argument("--thinking-budget", type=_at_least(0), default=None, metavar="TOKENS", help="with --chat: a "
                   "reasoning model thinks at most this many tokens, then its </think> is forced (default: no bound)")
    _add_sampling_options(p)
    structured = p.add_argument_group("structured output (one of these: every token keeps the answer within it; "
                                      "on CUDA each step's token is then chosen on the host)")
    structured = structured.add_mutually_exclusive_group()
    structured.add_argument("-j", "--json-schema", metavar="SCHEMA",
                            help="the answer is JSON that this JSON schema accepts ('{}': any JSON value)")
    structured.add_argument("--json-schema-file", metavar="FILE", help="the same, the schema read from a file")
    structured.add_argument("--grammar", metavar="GBNF", help="the answer keeps to this llama.cpp GBNF grammar "
                            "(its rule root)")
    structured.add_argument("--grammar-file", metavar="FILE", help="the same, the grammar read from a file")
    p.add_argument("--json", metavar="OUT", help="also write a record here: text, token counts, tokens/s, achieved sparsity")
    _add_runtime_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="a conversation in the terminal: type a message, the answer streams, the "
                       "conversation is kept (lines from stdin; /help lists the commands)")
    _add_model_options(p)
    p.add_argument("-n", type=int, default=512, help="new tokens an answer at most (default 512)")
    p.add_argument("--system", default=None, help="the system message (default: the template's own, if any)")
    p.add_argument("--thinking-budget", type=_at_least(0), default=None, metavar="TOKENS", help="a reasoning model "
                   "thinks at most this many tokens an answer, then its </think> is forced (default: no bound)")
    p.add_argument("--ctx", type=_at_least(2), default=None, help="tokens of context, the conversation plus an "
                   "answer: the KV cache's length (default: the model's); the oldest turns are dropped beyond it")
    p.add_argument("--quiet", action="store_true", help="no model line and no figures after each answer")
    _add_sparsity_options(p)
    _add_sampling_options(p)
    _add_runtime_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and text completions, the "
                       "Responses API, Anthropic's Messages API; streaming)")
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: a free one, printed at start)")
    p.add_argument("--sparsity", default="0", help="target activation sparsity in [0, 1), or auto: the model's "
                   "recommended level (dense when its metadata has none)")
    p.add_argument("--mode", choices=["unified", "greedy", "global"], default=None,
                   help="which calibrated thresholds (default greedy where the model has them, else unified; "
                        "with --sparsity auto the recommended)")
    p.add_argument("--criterion", default=None, help="teal or wina (default: the model's recommended, else teal)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--gemv", choices=GEMV_CHOICES, default="auto",
                   help="CPU matrix-vector products, as for generate (auto: native where a C compiler works)")
    p.add_argument("--ctx", type=_at_least(2), default=None, help="tokens of context per request, prompt plus completion "
                   "(default: the model's)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' or 'x-api-key: KEY' "
                   "(default: $SPQT_API_KEY, else no key)")
    p.add_argument("--name", default=None, help="the model id clients use (default: the model file's name)")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="answer cross-origin requests (CORS) from this browser origin, e.g. http://localhost:3000, "
                        "or * for any; repeatable (default: none, so a web page cannot call the server)")
    p.add_argument("--responses-store", type=_at_least(0), default=None, metavar="N",
                   help="the Responses API keeps the last N responses (store: true) in this process's memory, for "
                        "previous_response_id and GET /v1/responses/ID; 0: none (default 256, "
                        "spqt.serve.response_store.DEFAULT_CAPACITY)")
    p.add_argument("--thresholds", help="thresholds JSON from spqt calibrate --json (instead of the model's own)")
    p.add_argument("--no-dense-fallback", action="store_true",
                   help="run every map sparse, also where its sparse kernel is slower than dense, as generate's")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--reasoning-format", choices=("auto", "none"), default="auto",
                   help="auto (the default): a chat answer's <think>...</think> as the message's reasoning_content "
                        "where the model's chat template writes think tags (Qwen3, DeepSeek-R1's distills), as vLLM "
                        "and llama.cpp give it; none: all of the answer as content")
    p.add_argument("--thinking-budget", type=_at_least(0), default=None, metavar="TOKENS",
                   help="a reasoning model's thinking at most this many tokens an answer, then its </think> forced, "
                        "where a request gives no budget of its own (thinking_token_budget, the Messages API's "
                        "thinking.budget_tokens); default: no bound")
    p.add_argument("--prompt-cache", choices=("auto", "on", "off"), default="auto",
                   help="prefill only what follows the part of a prompt the request before left in the KV cache, "
                        "as a chat's next turn (auto, the default, is on); answers can "
                        "differ from a whole prefill's in the last bits of the logits; a client learns how long a "
                        "prefix its prompt shares with the request before, another client's too (off where that "
                        "matters)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("perplexity", help="perplexity on a text file, dense and at sparsity levels")
    p.add_argument("model", nargs="?", help=".spqt (quantized), .gguf or HF folder (its own weights), or "
                   "hf:ORG/REPO[:QUANT] (the Hugging Face Hub); default: SmolLM2-135M-Instruct")
    p.add_argument("--data", required=True, help="a UTF-8 text file (e.g. WikiText-2 raw test); one trailing newline "
                   "is dropped, as llama-perplexity drops it")
    p.add_argument("--ctx", type=_at_least(4), default=512, help="tokens a chunk (default 512; at most the model's context)")
    p.add_argument("--method", choices=["llamacpp", "gptq"], default="llamacpp",
                   help="llamacpp (default: each chunk's second half scored, on a dense first half, as "
                        "llama-perplexity) or gptq (GPTQ's and TEAL's: every token after a chunk's first scored, the "
                        "thresholds on throughout)")
    p.add_argument("--chunks", type=_at_least(1), default=None, help="evaluate only the first N chunks (default: all)")
    p.add_argument("--sparsity", type=_floats, default=[0.0], help="comma-separated levels, e.g. 0,0.25,0.4,0.5,0.65")
    p.add_argument("--mode", choices=["unified", "greedy", "global"], default=None,
                   help="which calibrated thresholds (default greedy where the model has them, else unified)")
    p.add_argument("--criterion", default=None, help="teal or wina (default: the model's recommended, else teal)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="fp32", help="compute dtype: fp32 (default), fp16, bf16, auto")
    p.add_argument("--batch", type=_at_least(1), default=None, help="chunks per forward (default 16 on cuda, 1 on cpu)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--thresholds", help="thresholds JSON from spqt calibrate --json (instead of the model's own)")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("calibrate", help="compute activation-sparsity thresholds (TEAL or WINA) and store them in "
                       "the .spqt")
    p.add_argument("model", nargs="?", help="a .spqt file or hf:ORG/REPO[:QUANT] (default: the default model in the "
                   "cache); a .gguf or HF folder with --json alone, which then holds the thresholds")
    p.add_argument("--data", nargs="+", required=True, help="calibration text files (never the evaluation text)")
    p.add_argument("--tokens", type=_at_least(1), default=65536,
                   help="calibration tokens for the histograms (whole windows of 512, at least one; default 65536)")
    p.add_argument("--greedy-tokens", type=_at_least(1), default=2048,
                   help="tokens whose block outputs the greedy search measures (whole windows of 512, at least one; "
                        "default 2048)")
    p.add_argument("--mode", choices=list(CALIBRATE_MODES), default="both",
                   help="both: unified and greedy (default); global: levels per block chosen by measured loss "
                        "(one pass per block and level: minutes on a GPU, long on a CPU); all: the three")
    p.add_argument("--criterion", default=sp_default_criterion(), help="teal (|x| > t) or wina (|x| * column norm > t)")
    p.add_argument("--greedy-step", type=float, default=None,
                   help="block sparsity added per greedy step (default: calibrate.STEP, 0.0125)")
    p.add_argument("--held-out-tokens", type=int, default=8192,
                   help="the last tokens of the calibration text, kept out and scored per level for the "
                        "recommendation (default 8192; 0: skip)")
    p.add_argument("--sparsity", type=_floats, default=[0.25, 0.4, 0.5, 0.65],
                   help="comma-separated levels in (0, 1) (default 0.25,0.4,0.5,0.65); the criterion's thresholds "
                        "of other levels and modes are dropped")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("-o", "--output", help="write the calibrated model here instead of in place")
    p.add_argument("--json", help="also write the thresholds alone as JSON")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("bench", help="GPU benchmarks: gemv (the five kernels) or decode (end to end)")
    p.add_argument("what", choices=["gemv", "decode"])
    p.add_argument("--shapes", default="llama2-7b,llama3-8b,llama2-13b,llama2-70b",
                   help="model names, runtime, default (the default model's maps) or NxK, comma-separated")
    p.add_argument("--sparsity", type=_floats, default=[0, 0.25, 0.4, 0.5, 0.65])
    p.add_argument("--variants", default="B0,B1,B2,B3,B4,fp16")
    p.add_argument("--types", default="q4_k", help="weight types, comma-separated: q4_k (gemv: every variant), "
                   "q8_0, q6_k, q5_k, q3_k, q2_k (gemv: zigzag B2 and B4; decode: synthetic models, zigzag)")
    p.add_argument("--model", default=None,
                   help="decode: a model file, hf:ORG/REPO[:TAG] (the Hugging Face Hub) or synthetic:llama2-7b etc.")
    p.add_argument("--layouts", default="row,zigzag")
    p.add_argument("--head", default="auto",
                   help="decode, synthetic models: the output head's type, as spqt quantize's --head (default auto: q6_k)")
    p.add_argument("--prompt-tokens", type=_at_least(1), default=PROMPT_TOKENS, help="decode: the prompt's length")
    p.add_argument("--new-tokens", type=_at_least(4), default=NEW_TOKENS,
                   help="decode: tokens generated (at least 4: the first two steps, the graphs' capture, are not "
                        "timed)")
    p.add_argument("--dtype", default="auto", help="decode: the compute dtype, auto (the runtime's: fp16, bf16 for "
                   "the families --dtype auto runs in bf16), fp16, bf16 or fp32 (the CUDA GEMV runs fp16 and bf16; "
                   "fp32 the Triton one)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="gemv: write a PNG of speedup vs sparsity here")
    p.add_argument("--one-process", action="store_true",
                   help="decode: time every row in this process (on the H200 a row's time depends on what its process "
                        "ran before it, up to 3 %% either way; by default each type, layout and level runs in a process "
                        "of its own, as a user's run at that setting)")
    p.add_argument("--after-capture", action="store_true",
                   help="decode: capture one throwaway CUDA graph before timing (a process's graphs replay slower once "
                        "it has made a second capture, 1-2 %% on an H100's 7B step; spqt serve is in that state from "
                        "its start)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("tune", help="time kernel configurations per shape and save the winners for this GPU")
    p.add_argument("--shapes", help="NxK list or names; runtime = the fused matrices of the synthetic and default "
                   "models; default = the default model's alone; a synthetic model's name = its layers' maps as the "
                   "runtime runs them (q|k|v and gate|up fused; not the head: give it as VOCABxDIM) and, for the four "
                   f"of bench gemv, its matrices one by one (default {TUNE_SHAPES})")
    p.add_argument("--model", metavar="MODELS",
                   help="tune the maps of these .spqt models (files or hf:ORG/REPO[:TAG], comma-separated) that "
                        "this GPU's table has no entries for: each map's type on its shape as stored (a quantized head "
                        "dense only), instead of --shapes and --types; the table's other entries stay")
    p.add_argument("--retune", action="store_true",
                   help="--model: time every map again, also those with entries (the shipped ones may have been "
                        "judged in whole decode steps, which a map timed alone can undo)")
    p.add_argument("--output", help="table path (default: this GPU's user table, <gpu>.json in $SPQT_TUNED, else "
                   "$XDG_DATA_HOME/spqt/tuned or ~/.local/share/spqt/tuned, which the runtime reads instead of the "
                   "package's); written whole: the table in use with this run's entries")
    p.add_argument("--crossover-only", action="store_true",
                   help="keep this GPU's tuned configs; measure only where sparse starts beating dense per shape "
                        "(of each of --types)")
    p.add_argument("--cuda-against-table", action="store_true",
                   help="time the CUDA C++ GEMV's configs against this GPU's tuned entry per shape (B2, B4), keep the "
                        "faster and measure the crossover anew")
    p.add_argument("--types", help="weight types to tune, comma-separated: q4_k (the default; its B0, B2, B4), "
                   "q8_0, q6_k, q5_k, q3_k, q2_k (zigzag B2 and B4); the others keep their entries. With "
                   "--crossover-only: the types whose crossovers are measured; with --routes: the types the synthetic "
                   "models are timed in (a model file brings its own)")
    p.add_argument("--routes", metavar="MODELS",
                   help="keep the kernel entries; time whole decode steps of these models (synthetic:NAME, in each "
                        "of --types, or a zigzag .spqt, a file or hf:ORG/REPO[:TAG], comma-separated), a process each "
                        "with MODE_KEPT off, on the norm-fed maps, on every sparse map, and with every map dense, and "
                        "save the fastest per model geometry, weight types and level (the runtime's default; dense "
                        "unless a sparse route beats it by 1 %%)")
    p.add_argument("--l2first", metavar="MODELS",
                   help="keep the kernel entries; judge in whole decode steps of these models (synthetic:NAME, "
                        "comma-separated) how many chunks each dense map's CUDA GEMV prefetches into L2 before it "
                        "waits for the kernel before it, and save the depth per shape")
    p.add_argument("--pairs", metavar="MODELS",
                   help="keep the kernel entries; judge in whole decode steps of these models (synthetic:NAME, "
                        "comma-separated) whether each dense map's CUDA GEMV (8 or 2 accumulators) multiplies tile "
                        "pairs, and save the choice per shape")
    p.add_argument("--route-levels", type=_floats, default=[0.25, 0.4, 0.5, 0.65],
                   help="--routes: sparsity levels, comma-separated (a level runs the route of the highest level timed "
                        "at or below it; below all of them, off); default the evaluation's 0.25,0.4,0.5,0.65 (a process "
                        "a route and level and one for the dense step, each round: 26 on the 7B, ~5 minutes on an H200)")
    p.add_argument("--route-rounds", type=_at_least(1), default=2,
                   help="--routes: rounds of the routes in turn (median)")
    p.add_argument("--prompt-tokens", type=_at_least(1), default=PROMPT_TOKENS, help="--routes: as spqt bench decode")
    p.add_argument("--new-tokens", type=_at_least(4), default=NEW_TOKENS, help="--routes: as spqt bench decode")
    p.set_defaults(func=cmd_tune)
    parser.subcommands = sub.choices  # main() reports an unknown option under its subcommand's usage
    return parser


def main(argv: list[str] | None = None) -> int:
    # started with stdout or stderr closed (`>&-`, `2>&-`): Python's sys.stdout / sys.stderr is None, which fails on
    # write, and print(file=None) writes to stdout (stderr's lines in the answer): what goes there goes nowhere
    for stream in ("stdout", "stderr"):
        if getattr(sys, stream) is None:
            setattr(sys, stream, open(os.devnull, "w", encoding="utf-8"))
    try:
        parser = build_parser()  # (building the parser imports torch: a Ctrl-C can land there)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # parse_args would show the top-level usage, which lists none of the subcommand's options;
            # an unknown option before the subcommand is the top level's
            given = sys.argv[1:] if argv is None else list(argv)
            before = given[:given.index(args.command)] if args.command in given else []
            owner = parser if any(token in before for token in unknown) else parser.subcommands[args.command]
            owner.error(f"unrecognized arguments: {' '.join(unknown)}")
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at the interpreter's exit: a reader gone (`| head`) is caught below
        return status
    except SpqtError as e:
        print(f"spqt: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("spqt: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("spqt: error: out of memory", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader of a pipe went away (`spqt generate ... | head`, or of stderr): stop
        # quietly, as a tool that SIGPIPE ended
        _drop_stdout()
        return 128 + 13
    except OSError as e:  # one the commands do not name: stdout that cannot be written (`> /dev/full`: ENOSPC, EIO)
        print(f"spqt: error: {e}", file=sys.stderr)
        _drop_stdout()
        return EXIT_USAGE


def _one_line(error: Exception) -> str:
    """An error's text on one line: a message that quotes another library's (transformers' tokenizer errors list
    their causes line by line) has its lines joined."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _drop_stdout() -> None:
    """stdout on /dev/null, so that the interpreter's final flush of what it holds cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a descriptor (a test's capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
