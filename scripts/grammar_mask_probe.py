"""How long structured output's token mask takes a step on this machine's CPU: the default model's vocabulary, a JSON
schema, and the tokens of one answer that keeps to it walked through GrammarMatcher.allowed / consume, three times
(the median and the largest step of each walk, in microseconds). docs/RESULTS.md, fifty-eighth session.

    python scripts/grammar_mask_probe.py
"""

import statistics
import time

from spqt import grammar
from spqt.checkpoint import load_model
from spqt.default_model import default_gguf
from spqt.tokenizer import TextTokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"]}
ANSWER = '{\n    "name": "Marie Curie",\n    "age": 66,\n    "tags": ["physics", "chemistry", "radioactivity"]\n}'


def main() -> None:
    loaded = load_model(default_gguf())
    tok = TextTokenizer(loaded.tokenizer, loaded.config)
    vocabulary = grammar.Vocabulary(tok, loaded.config.vocab_size, tok.stop_ids)
    start = time.perf_counter()
    g = grammar.json_schema(SCHEMA, vocabulary)
    print(f"vocabulary and schema: {time.perf_counter() - start:.3f} s ({loaded.config.vocab_size} tokens)")
    for _ in range(3):
        m, times = g.matcher(), []
        for token in tok.encode(ANSWER):
            t0 = time.perf_counter()
            allowed = m.allowed("cpu")
            times.append(time.perf_counter() - t0)
            assert allowed[token], tok.decode([token])
            m.consume(token)
        print(f"{len(times)} steps: median {1e6 * statistics.median(times):.1f} us, largest {1e6 * max(times):.1f} us")


if __name__ == "__main__":
    main()
