"""Test helpers: a tiny random Llama-style chat model built locally in a second or two.

``build_tiny_model(folder)`` writes a plain Hugging Face folder (config, safetensors, a
byte-level BPE tokenizer trained here with ``tokenizers``, a ChatML chat template like
SmolLM2's, generation config) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load and that
every backend can run. Nothing is downloaded; the same seed gives the same weights.

``write_tiny_gguf(model_folder, path)`` writes that model as an fp32 GGUF file, the way
llama.cpp lays out a Llama, so the GGUF conversion path can be tested without the real model.
"""

from __future__ import annotations

from pathlib import Path

# SmolLM2's template without its default system prompt: same markers, shorter prompts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

_CORPUS = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
What is the capital of Spain? The capital of Spain is Madrid.
A helpful assistant answers the question that was asked, clearly and honestly.
A harmless assistant refuses to help with dangerous or illegal requests and explains why.
Which response is better, A or B? Response A is more helpful. Response B is more harmless.
Critique the response: it is rude and it does not answer the question. Revise it to be kind.
Please write a short poem about the sea. The sea is wide and blue, the waves come and go.
How do I bake bread? Mix flour, water, salt and yeast, let the dough rise, then bake it.
Numbers: one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore.
user assistant system principle constitution judge verdict preference chosen rejected.
"""


def _train_tokenizer(vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level like GPT-2 and SmolLM2: every string is encodable, no unknown tokens.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    folder: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama chat model with its tokenizer into ``folder``.

    Args:
        folder: where to write (created if needed).
        hidden_size: model width.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (grouped-query attention, as in SmolLM2).
        vocab_size: BPE vocabulary size, special tokens included.
        max_position_embeddings: context length, small so overflow is easy to test.
        seed: torch seed for the weights.

    Returns:
        The folder.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        # Wider than the usual 0.02 so logits are spread out: greedy picks are clear-cut,
        # not near-ties that float rounding could flip.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _permute(weights, n_head: int):  # numpy array -> numpy array
    """llama.cpp's q/k row permutation (transformers undoes it when reading a GGUF)."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_tiny_gguf(model_folder: str | Path, path: str | Path) -> Path:
    """Write a model made by :func:`build_tiny_model` as an fp32 GGUF file.

    Args:
        model_folder: a folder from :func:`build_tiny_model`.
        path: the ``.gguf`` file to write.

    Returns:
        ``path``.
    """
    import json

    import numpy as np
    from gguf import GGUFWriter, TokenType
    from safetensors.numpy import load_file

    model_folder, path = Path(model_folder), Path(path)
    cfg = json.loads((model_folder / "config.json").read_text(encoding="utf-8"))
    tok = json.loads((model_folder / "tokenizer.json").read_text(encoding="utf-8"))
    weights = load_file(str(model_folder / "model.safetensors"))

    vocab = {t: i for t, i in tok["model"]["vocab"].items()}
    for added in tok["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    types = [TokenType.CONTROL if t in special else TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def put(name: str, array) -> None:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    put("token_embd.weight", weights["model.embed_tokens.weight"])
    put("output_norm.weight", weights["model.norm.weight"])
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", weights[pre + "input_layernorm.weight"])
        put(f"blk.{i}.attn_q.weight", _permute(weights[pre + "self_attn.q_proj.weight"], n_head))
        put(f"blk.{i}.attn_k.weight", _permute(weights[pre + "self_attn.k_proj.weight"], n_kv))
        put(f"blk.{i}.attn_v.weight", weights[pre + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", weights[pre + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", weights[pre + "post_attention_layernorm.weight"])
        put(f"blk.{i}.ffn_gate.weight", weights[pre + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", weights[pre + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", weights[pre + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
