"""Which quantization type each linear map gets: one type for all, or a named mix.

The mixes follow llama.cpp's recipes (``llama_tensor_get_type`` in llama-quant.cpp) for a dense
Llama: every matrix gets the mix's base type except

* Q4_K_M (base Q4_K) and Q5_K_M (base Q5_K): attn_v and ffn_down get Q6_K in the "more bits"
  layers: the first eighth, the last eighth, and every third layer in between (layer i with
  i < n/8, or i >= 7n/8, or (i - n/8) mod 3 == 2; 14 of SmolLM2's 30 layers).
* Q4_K_S (base Q4_K): attn_v gets Q5_K in layers 0-3, ffn_down Q5_K in the first eighth.
* Q3_K_M (base Q3_K): attn_v gets Q5_K in layers 0 and 1 and Q4_K elsewhere; ffn_down Q5_K in
  the first sixteenth of the layers and Q4_K elsewhere; attn_output Q4_K.
* Q3_K_L (base Q3_K): attn_v, ffn_down and attn_output get Q5_K in every layer.
* Q5_K_S and Q3_K_S: the base type everywhere (llama.cpp widens nothing in a dense model's layers;
  the head follows head_type as for every mix).

Not here: llama.cpp's Q2_K recipe (attn_v, ffn_down and attn_output in Q3_K, or attn_v in Q4_K
where 4 or more query heads share a key head), since our q2_k is the plain type, as our q4_k is,
and llama.cpp gives that recipe no name of its own; and Q2_K_S, which llama.cpp refuses without an
importance matrix.

Where we differ from llama.cpp, and why:

* q, k and v are stored as one fused matrix (one input, one index list, one kernel), so the fused
  matrix takes the WIDEST type of its members: where llama.cpp widens attn_v, our q|k|v widens
  with it (more bits than llama.cpp spends, never fewer). gate|up have no recipe of their own.
* The output head follows llama.cpp's recipe for output.weight (head_type: Q6_K, or Q8_0 in a Q8_0
  model). A head tied to the embedding stays fp16 by default: the embedding's lookups read fp16 rows, so
  a quantized head is a copy beside it (more memory; llama.cpp quantizes the shared matrix itself); a
  type named for it (--head q6_k) stores that copy, which the runtime's head then reads.
* llama.cpp widens a 70B's attn_v (Q3_K or Q4_K to Q5_K), which is 8x smaller than its attn_q there;
  our fused q|k|v would carry Q5_K into q and k as well (about 2 % more bytes for the whole model to
  read each token), so a mix's q|k|v follows the rules above at every size.
* llama.cpp falls back to a legacy type (Q5_0, Q8_0, ...) for matrices whose rows are not a
  multiple of 256 (SmolLM2's 576); we pad with zeros instead (layouts.py), so every matrix keeps
  its K-quant.
"""

from spqt.errors import SpqtError
from spqt.formats import FORMATS

MIXES = ("q4_k_m", "q5_k_m", "q3_k_m", "q4_k_s", "q5_k_s", "q3_k_s", "q3_k_l")

# Canonical fused groups (checkpoint.LINEAR_GROUPS) and the llama.cpp tensors inside them.
_MEMBERS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
            "down": ("ffn_down",)}


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _member_type(mix: str, tensor: str, layer: int, n_layers: int) -> str:
    if mix in ("q4_k_m", "q5_k_m"):
        base = "q4_k" if mix == "q4_k_m" else "q5_k"
        if tensor in ("attn_v", "ffn_down") and _more_bits(layer, n_layers):
            return "q6_k"
        return base
    if mix == "q4_k_s":
        if (tensor == "attn_v" and layer < 4) or (tensor == "ffn_down" and layer < n_layers // 8):
            return "q5_k"
        return "q4_k"
    if mix in ("q5_k_s", "q3_k_s"):
        return mix[:4]
    if mix == "q3_k_l":
        return "q5_k" if tensor in ("attn_v", "ffn_down", "attn_output") else "q3_k"
    # q3_k_m
    if tensor == "attn_v":
        return "q5_k" if layer < 2 else "q4_k"
    if tensor == "ffn_down":
        return "q5_k" if layer < n_layers // 16 else "q4_k"
    if tensor == "attn_output":
        return "q4_k"
    return "q3_k"


def check_quant_type(name: str) -> str:
    """A type (q8_0, q6_k, ...) or a mix (q4_k_m, ...), lower-cased; anything else: SpqtError."""
    key = name.lower()
    if key not in FORMATS and key not in MIXES:
        raise SpqtError(f"unknown quantization type or mix {name!r}; types: {', '.join(FORMATS)}; "
                        f"mixes: {', '.join(MIXES)}")
    return key


HEAD_CHOICES = ("auto", "fp16")  # besides a format name


def head_type(quant: str, head: str = "auto", tied: bool = False) -> str | None:
    """The format the output head is stored in for a model of type or mix `quant`: None (fp16) for head "fp16",
    a format name as given, or for "auto" llama.cpp's choice for output.weight (llama_tensor_get_type: Q6_K unless
    the model is Q8_0, then Q8_0), which a head tied to the embedding does not take (None: no copy). Anything
    else: SpqtError."""
    key = head.lower()
    if key == "fp16" or (key == "auto" and tied):
        return None
    if key == "auto":
        return "q8_0" if check_quant_type(quant) == "q8_0" else "q6_k"
    if key not in FORMATS:
        raise SpqtError(f"unknown head type {head!r}; choose {', '.join(HEAD_CHOICES)} or one of {', '.join(FORMATS)}")
    return key


def formats_of(name: str) -> tuple[str, ...]:
    """The formats a type or mix stores its layer maps in (a mix's as a 32-layer model has them), widest first."""
    key = check_quant_type(name)
    if key in FORMATS:
        return (key,)
    return tuple(sorted(set(group_types(key, 32).values()), key=list(FORMATS).index))


def group_types(name: str, n_layers: int) -> dict[str, str]:
    """'layers.{i}.{qkv,o,gate_up,down}' -> the format that matrix is stored in."""
    key = check_quant_type(name)
    out = {}
    for i in range(n_layers):
        for group, members in _MEMBERS.items():
            if key in FORMATS:
                out[f"layers.{i}.{group}"] = key
                continue
            types = [_member_type(key, m, i, n_layers) for m in members]
            out[f"layers.{i}.{group}"] = min(types, key=list(FORMATS).index)  # FORMATS runs widest first
    return out
