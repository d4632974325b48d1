"""lm-evaluation-harness against `spqt serve`: the same three tasks through the server (lm-eval's local-completions:
token ids, echo, logprobs, max_tokens 1; generations with stop strings) and through lm-eval's own Hugging Face model
on the same float weights (the default model's GGUF dequantized by transformers), each document's loglikelihoods,
greedy answers and the metrics compared; with --chat, the generations through the chat endpoint too.

lm-eval runs in an environment of its own (it pins what this project does not), for example

    python3 -m venv /tmp/lme && /tmp/lme/bin/pip install torch==2.13.0 "lm-eval[api,hf]" gguf
    python scripts/lm_eval_probe.py --lm-eval-python /tmp/lme/bin/python \
        --text ../shared/data/wikitext-2-raw-v1-test.txt --docs 6 --json out.json

The tasks, written to a temporary folder as local files: a rolling loglikelihood (lm-eval's word / byte perplexity,
as its wikitext task) over the first --docs articles of --text, windows of --max-length tokens, and a multiple-choice
task of the 16 questions below (loglikelihood of each choice after its question), and a generation task of the same
questions (greedy, up to 24 tokens, until a newline or a full stop). spqt serve runs the GGUF (its float
weights, as transformers reads them) on the CPU, dense, --ctx --max-length (lm-eval's prompts of max_length - 1 tokens
and the one it asks for); lm-eval's HF model gets max_length - 2, which gives it the same windows. Anything else on
the command line goes to spqt serve (--device; --sparsity, where the two differ by design: the prompt scored sparse; with --serve-model default,
the zigzag Q4_K model against the HF model's Q4_1 weights).
"""

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_probe import start  # noqa: E402

QUESTIONS = [  # (question, choices, index of the right one)
    ("The capital of France is", [" Paris", " London", " Berlin", " Madrid"], 0),
    ("Water freezes at a temperature of", [" 100 degrees Celsius", " 0 degrees Celsius", " 50 degrees Celsius"], 1),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter", " Mercury"], 2),
    ("A week has", [" five days", " seven days", " ten days"], 1),
    ("The opposite of hot is", [" cold", " loud", " tall", " green"], 0),
    ("Bees make", [" milk", " honey", " silk", " wool"], 1),
    ("The sun rises in the", [" west", " north", " east", " south"], 2),
    ("Two plus two equals", [" three", " four", " five", " six"], 1),
    ("The color of a clear daytime sky is", [" blue", " red", " black", " orange"], 0),
    ("Fish live in", [" trees", " deserts", " water", " clouds"], 2),
    ("The author of Romeo and Juliet is", [" Charles Dickens", " William Shakespeare", " Jane Austen"], 1),
    ("Ice is the solid form of", [" water", " sand", " air", " salt"], 0),
    ("The number of legs a spider has is", [" six", " eight", " four", " ten"], 1),
    ("The Pacific is an", [" ocean", " island", " mountain", " desert"], 0),
    ("A baby cat is called a", [" puppy", " calf", " kitten", " foal"], 2),
    ("The chemical symbol for gold is", [" Ag", " Au", " Fe", " Pb"], 1),
]

ROLLING = """task: spqt_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

CHOICE = """task: spqt_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

GENERATE = """task: spqt_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 24
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""

TASKS = ("spqt_rolling", "spqt_choice", "spqt_generate")


def articles(text: str, n: int) -> list[str]:
    """The first n articles of a WikiText raw file: each from its ' = Title = ' line to the next."""
    starts = [m.start() for m in re.finditer(r"^ = [^=].* = $", text, flags=re.M)]
    return [text[a:b].strip("\n") for a, b in zip(starts, starts[1:] + [len(text)])][:n]


def lm_eval(python: str, model: str, model_args: str, tasks: Path, out: Path, names=TASKS, chat=False) -> dict:
    """One lm-eval run of the named tasks -> {task: (metrics, [per-document responses, in document order])}: a
    loglikelihood as a float, a generation as its text."""
    cmd = [python, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args, "--tasks", *names,
           "--include_path", str(tasks), "--output_path", str(out), "--log_samples"]
    subprocess.run(cmd + (["--apply_chat_template"] if chat else []), check=True)
    found = {}
    for task in names:
        samples = sorted(out.rglob(f"samples_{task}_*.jsonl"))[-1]
        docs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda d: d["doc_id"])
        results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"][task]
        # a document's responses: rolling, its loglikelihood; multiple choice, (loglikelihood, is_greedy) a choice
        found[task] = ({k: v for k, v in results.items() if isinstance(v, float)},
                       [[r if task == "spqt_generate" else float(r[0]) if isinstance(r, list) else float(r)
                         for r in d["filtered_resps"]] for d in docs])
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm-eval-python", required=True, help="a python that has lm-eval[api,hf] and gguf")
    ap.add_argument("--text", type=Path, required=True, help="a WikiText raw file (the rolling task's articles)")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=2048, help="lm-eval's window (its max_length)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="write the tasks, logs and lm-eval's outputs here (kept)")
    ap.add_argument("--serve-model", help="what spqt serve serves (default: the default model's GGUF, the HF model's "
                    "weights; 'default': its zigzag Q4_K .spqt, calibrated, so --sparsity auto has a level)")
    ap.add_argument("--chat", action="store_true", help="also the generation task through the chat endpoint "
                    "(local-chat-completions) against the HF model, both with the model's chat template")
    args, extra = ap.parse_known_args()
    from spqt.default_model import default_gguf

    gguf = default_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or Path(tmp)
        tokenizer = tmp / "tokenizer"  # the GGUF's tokenizer as transformers reads it, for lm-eval's token ids
        subprocess.run([args.lm_eval_python, "-c", "import sys; from transformers import AutoTokenizer; "
                        "AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2]).save_pretrained(sys.argv[3])",
                        str(gguf.parent), gguf.name, str(tokenizer)], check=True)
        docs = articles(args.text.read_text(encoding="utf-8"), args.docs)
        (tmp / "rolling.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        (tmp / "choice.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "label": i}) + "\n"
                                                  for q, c, i in QUESTIONS))
        tasks = tmp / "tasks"
        tasks.mkdir(exist_ok=True)
        (tasks / "spqt_rolling.yaml").write_text(ROLLING.format(data=tmp / "rolling.jsonl"))
        (tasks / "spqt_choice.yaml").write_text(CHOICE.format(data=tmp / "choice.jsonl"))
        (tmp / "generate.jsonl").write_text("".join(json.dumps({"question": q, "answer": c[i].strip()}) + "\n"
                                                    for q, c, i in QUESTIONS))
        (tasks / "spqt_generate.yaml").write_text(GENERATE.format(data=tmp / "generate.jsonl"))
        served_model = None if args.serve_model == "default" else args.serve_model or str(gguf)
        proc, url, _ = start(served_model, "cpu", "0", tmp / "serve.log", ["--ctx", str(args.max_length), *extra])
        try:
            with urllib.request.urlopen(f"{url}/v1/models") as r:  # lm-eval names the model in each request
                name = json.loads(r.read())["data"][0]["id"]
            served = lm_eval(args.lm_eval_python, "local-completions",
                             f"model={name},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                             f"tokenizer={tokenizer},max_length={args.max_length}", tasks, tmp / "served")
            if args.chat:  # the chat endpoint: lm-eval applies no template, the server applies the model's
                served_chat = lm_eval(args.lm_eval_python, "local-chat-completions",
                                      f"model={name},base_url={url}/v1/chat/completions", tasks, tmp / "served-chat",
                                      names=("spqt_generate",), chat=True)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        log = (tmp / "serve.log").read_text(errors="replace")
        requests = len(re.findall(r"POST /v1/completions 200", log))
        level = re.search(r"spqt serve: model \S+ on \w+, ([^,]+(?:, [^,]+)?), context", log)
        # lm-eval's API models keep a token of max_length for the one they ask for, and roll windows of max_length - 2
        # tokens after one of context; its HF model rolls windows of max_length: the same windows at max_length - 2
        reference = lm_eval(args.lm_eval_python, "hf", f"pretrained={gguf.parent},gguf_file={gguf.name},"
                            f"dtype=float32,max_length={args.max_length - 2}", tasks, tmp / "hf")
        if args.chat:
            reference_chat = lm_eval(args.lm_eval_python, "hf", f"pretrained={gguf.parent},gguf_file={gguf.name},"
                                     f"dtype=float32", tasks, tmp / "hf-chat", names=("spqt_generate",), chat=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    report = {"commit": commit, "docs": len(docs), "questions": len(QUESTIONS), "max_length": args.max_length,
              "server_requests": requests, "serve_args": extra, "served_model": served_model or "default",
              "served": level.group(1) if level else "?"}
    print(f"{'metric':>28s} {'spqt serve':>12s} {'lm-eval hf':>12s}")
    runs = [(task, served[task], reference[task]) for task in TASKS]
    if args.chat:
        runs.append(("spqt_generate chat", served_chat["spqt_generate"], reference_chat["spqt_generate"]))
    for task, (mine, mine_docs), (theirs, their_docs) in runs:
        for name in sorted(theirs):
            print(f"{task + ' ' + name:>28s} {mine.get(name, float('nan')):12.5f} {theirs[name]:12.5f}")
        if task.startswith("spqt_generate"):  # greedy answers: the same text from both?
            same = [x == y for x, y in zip(mine_docs, their_docs, strict=True)]
            print(f"{task:>28s} answers: {sum(same)} of {len(same)} the same text")
            for (x,), (y,), s in zip(mine_docs, their_docs, same):
                if not s:
                    print(f"{'':>28s} served {x!r}, hf {y!r}")
            report[task] = {"served": mine, "hf": theirs, "same_answers": sum(same), "answers": len(same),
                            "different": [[x, y] for (x,), (y,), s in zip(mine_docs, their_docs, same) if not s]}
            continue
        diffs = [abs(a - b) for x, y in zip(mine_docs, their_docs, strict=True) for a, b in zip(x, y, strict=True)]
        print(f"{task:>28s} loglikelihoods: largest difference {max(diffs):.2e} (of {len(diffs)}; magnitudes up to "
              f"{max(abs(v) for x in their_docs for v in x):.0f})")
        report[task] = {"served": mine, "hf": theirs, "max_abs_loglikelihood_difference": max(diffs),
                        "loglikelihoods": len(diffs)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
